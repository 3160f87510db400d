// The shared preprocessing compiled to wasm32 must give the Python recipe's ids, like the native build.
// Run by scripts/test.sh after `wasm-bindgen --target nodejs` into target/web-node/.
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import assert from "node:assert/strict";
import test from "node:test";

const require = createRequire(import.meta.url);
const root = new URL("../../", import.meta.url).pathname;
const { Preprocessor } = require(`${root}target/web-node/web.js`);
const fixture = JSON.parse(readFileSync(`${root}tests/fixtures/recipe_preprocess.json`, "utf8"));
const shortHash = (s) => createHash("sha256").update(s, "utf8").digest("hex").slice(0, 16);

test("wasm preprocessing equals the recipe on every sample row of both formats", () => {
  const pre = new Preprocessor(readFileSync(`${root}.cache/tokenizer-gemma/tokenizer.json`));
  assert.equal(pre.engine, "gemma-bpe");
  for (const [file, expected] of Object.entries(fixture.files)) {
    const rows = JSON.parse(pre.prepareFile(file, readFileSync(`${root}${file}`)));
    assert.equal(rows.length, expected.length, file);
    rows.forEach((row, i) => {
      assert.equal(row.id, expected[i].id, `${file} row ${i}`);
      assert.equal(shortHash(row.input_ids.join(",")), expected[i].ids_sha, `${file} id ${row.id}`);
    });
  }
});

test("wasm reports bad input with the file name", () => {
  const pre = new Preprocessor(readFileSync(`${root}.cache/tokenizer-gemma/tokenizer.json`));
  assert.throws(() => pre.prepareFile("broken.parquet", new Uint8Array([80, 65, 82, 49, 0, 0])), /broken\.parquet/);
});

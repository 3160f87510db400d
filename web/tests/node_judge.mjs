// The model compiled to wasm (CPU backend; Node has no WebGPU) scores rows as `trainer predict` does natively
// with the same web bundle. scripts/test.sh writes the bundle (`trainer demo`) and the native predictions first.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import assert from "node:assert/strict";
import test from "node:test";

const require = createRequire(import.meta.url);
const root = new URL("../../", import.meta.url).pathname;
const { Judge } = require(`${root}target/web-node/web.js`);
const bundle = `${root}runs/demo/export/web/`;
const manifest = JSON.parse(readFileSync(`${bundle}manifest.json`, "utf8"));
const ROWS = 12;

const readCsv = (text) =>
  Object.fromEntries(
    text.trim().split("\n").slice(1).map((line) => {
      const [id, winner, a, b] = line.split(",");
      return [id, { winner, a: Number(a), b: Number(b) }];
    }),
  );

const load = (weightsFile, bytes) =>
  Judge.load(
    readFileSync(`${bundle}config.json`),
    readFileSync(`${bundle}tokenizer.json`),
    weightsFile,
    bytes ?? readFileSync(`${bundle}${weightsFile}`),
    "cpu",
  );

test("wasm predictions equal trainer predict on the same bundle within 1e-3", async () => {
  const weights = manifest.weights[0].file;
  const judge = await load(weights);
  assert.equal(judge.backend, "cpu");
  const data = readFileSync(`${root}data/arena-sample.parquet`);
  const wasm = readCsv(await judge.predictFile("arena-sample.parquet", data, false, ROWS, 4));
  const native = readCsv(readFileSync(`${root}target/test-demo/native-${ROWS}.csv`, "utf8"));
  assert.equal(Object.keys(wasm).length, ROWS);
  for (const [id, n] of Object.entries(native)) {
    const w = wasm[id];
    assert.ok(w, `row ${id} missing`);
    assert.ok(Math.abs(w.a - n.a) < 1e-3 && Math.abs(w.b - n.b) < 1e-3, `row ${id}: wasm ${w.a} native ${n.a}`);
    assert.equal(w.winner, n.winner);
  }
});

test("one pair from text: probabilities, token counts and snipped parts", async () => {
  const judge = await load(manifest.weights[0].file);
  const long = "word ".repeat(600);
  const p = JSON.parse(await judge.predict("Which is better?", long, "Short answer.", true));
  assert.ok(Math.abs(p.prob_model_a + p.prob_model_b - 1) < 1e-5);
  assert.deepEqual(p.snipped, [false, true, false]);
  assert.ok(p.tokens <= 512 && p.field_tokens[1] >= 600, JSON.stringify(p));
});

test("a corrupt weights file is a clear error", async () => {
  await assert.rejects(load("model.f16.safetensors", new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9])), /model\.f16\.safetensors/);
});

// A gemma-2-2b-shaped bundle in the browser: hidden 2304, the 256k vocabulary, q4 or int8 weights (`make_bundle`,
// random), 4 layers in CI (scripts/test.sh) and all 26 in scripts/test_full_size.sh. Streamed from a sub-path into
// the worker's model, the packed projections on WebGPU (SwiftShader here), it must score a short pair as
// `trainer predict --weights W` does within 1e-3, and record the peak wasm memory and the GPU bytes.
// Inputs: ARENA_LARGE_BUNDLE (a make_bundle output directory), ARENA_LARGE_WEIGHTS (q4 by default) and the native
// predictions of short-pair.csv in ARENA_LARGE_BUNDLE-native-W.csv.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { open, root, serve, waitReady } from "./lib/browser.mjs";

const dir = process.env.ARENA_LARGE_BUNDLE ?? `${root}target/test-bundles/h2304-l4`;
const config = JSON.parse(readFileSync(`${dir}/web/config.json`, "utf8"));
const weights = process.env.ARENA_LARGE_WEIGHTS ?? "q4";
const native = readFileSync(`${dir}-native-${weights}.csv`, "utf8").trim().split("\n")[1].split(",");
const pair = readFileSync(`${root}web/browser-tests/short-pair.csv`, "utf8").trim().split("\n")[1];
const [, prompt, answerA, answerB] = pair.match(/^[^,]*,([^,]*),([^,]*),"(.*)"$/);

// 26 layers on SwiftShader take far longer than 4.
const budget = config.num_hidden_layers > 8 ? 7_200_000 : 900_000;

let server;
let base;
before(async () => {
  ({ server, base } = await serve({ "/models/large/": `${dir}/web/` }));
});
after(() => server.close());

test(`a ${config.hidden_size} x ${config.num_hidden_layers} ${weights} bundle streams to WebGPU and scores as trainer predict does`, async () => {
  const t0 = Date.now();
  const { browser, page, logs } = await open(`${base}?bundle=models/large/&weights=${weights}&backend=webgpu`, true);
  try {
    await waitReady(page, logs, budget);
    const loadSeconds = (Date.now() - t0) / 1000;
    assert.equal(await page.locator("#backend").innerText(), "webgpu");
    const source = page.locator("#source");
    const wasm = Number(await source.getAttribute("data-wasm-memory"));
    const gpu = Number(await source.getAttribute("data-gpu-bytes"));
    const host = Number(await source.getAttribute("data-host-bytes"));
    // The estimate shown before downloading is what loading then took.
    const device = page.locator("#device-info");
    assert.equal(Number(await device.getAttribute("data-gpu-bytes")), gpu);
    assert.equal(Number(await device.getAttribute("data-host-bytes")), host);
    const file = JSON.parse(readFileSync(`${dir}/web/manifest.json`, "utf8")).files.find((f) => f.file === `model.${weights}.safetensors`).bytes;
    // Streamed: the wasm memory holds the table over one binding (when it is) and the tokenizer, not the file.
    assert.ok(wasm < 1.5e9, `peak wasm memory ${wasm}`);
    assert.ok(gpu > 0 && gpu + host < 1.3 * file, `packed: ${gpu} on the GPU and ${host} on the host for a ${file}-byte file`);
    await page.fill("#prompt", prompt);
    await page.fill("#answer-a", answerA);
    await page.fill("#answer-b", answerB);
    const t1 = Date.now();
    await page.click("#predict");
    await page.waitForSelector("#result, #predict-error", { timeout: budget });
    const firstSeconds = (Date.now() - t1) / 1000;
    assert.equal(await page.locator("#predict-error").count(), 0, await page.locator("body").innerText());
    const pa = Number(await page.locator("#result").getAttribute("data-pa"));
    assert.ok(Math.abs(pa - Number(native[2])) < 1e-3, `browser ${pa}, native ${native[2]}`);
    mkdirSync(`${root}target/browser`, { recursive: true });
    const name = `large-h${config.hidden_size}-l${config.num_hidden_layers}-${weights}`;
    const record = { weights, hidden: config.hidden_size, layers: config.num_hidden_layers, file_bytes: file, wasm_memory_bytes: wasm, gpu_bytes: gpu, host_bytes: host, p_a: pa, native_p_a: Number(native[2]), load_s: loadSeconds, first_prediction_s: firstSeconds };
    writeFileSync(`${root}target/browser/${name}.json`, JSON.stringify(record, null, 1));
    console.log(JSON.stringify(record));
    await page.screenshot({ path: `${root}target/browser/${name}.png`, fullPage: true });
  } finally {
    await browser.close();
  }
});

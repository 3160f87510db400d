// Browser side of bench/browser_vs_native.sh: time to first prediction (page load, bundle, model build and the
// first pair) and per-pair latency, in headless Chromium on WebGPU (or the CPU fallback with BACKEND=cpu).
//   node bench/browser_latency.mjs BASE_URL [webgpu|cpu] [PAIRS]
import { createRequire } from "node:module";

const root = new URL("../", import.meta.url).pathname;
const { chromium } = createRequire(`${root}.cache/browser/`)("playwright-core");
const [base, backend = "webgpu", pairs = "5"] = process.argv.slice(2);
const flags = ["--no-sandbox", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync"];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: backend === "webgpu" ? [...flags, "--enable-unsafe-webgpu"] : flags,
});
const page = await browser.newPage();
const t0 = Date.now();
await page.goto(`${base}?backend=${backend}`);
await page.waitForSelector('#status[data-status="ready"]', { timeout: 600_000 });
const ready = (Date.now() - t0) / 1000;
const latencies = [];
for (let i = 0; i <= Number(pairs); i++) {
  const prev = await page.locator("#result").getAttribute("data-pa").catch(() => null);
  const start = Date.now();
  await page.click(`button[data-example="${i % 6}"]`);
  await page.waitForFunction(
    (p) => document.querySelector("#result")?.dataset.pa !== p && !document.querySelector("#predict").disabled,
    prev,
    { timeout: 600_000 },
  );
  latencies.push((Date.now() - start) / 1000);
}
const first = ready + latencies[0];
const rest = latencies.slice(1);
console.log(JSON.stringify({
  backend,
  ready_s: ready,
  first_prediction_s: first,
  per_pair_s: rest.reduce((a, b) => a + b, 0) / rest.length,
}));
await browser.close();

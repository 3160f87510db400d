// Browser side of bench/browser_max_bundle.sh: opens the site on one bundle in headless Chromium (WebGPU), waits
// for the model to load, predicts one example pair twice and prints one JSON line: whether it worked, how long
// loading, the first prediction (which compiles the GPU pipelines) and the second (per-pair latency) took, where
// the embedding went, and the error text if it failed.
//   node bench/browser_max_bundle.mjs BASE_URL BUNDLE_PATH [q4|int8|f16]
import { createRequire } from "node:module";

const root = new URL("../", import.meta.url).pathname;
const { chromium } = createRequire(`${root}.cache/browser/`)("playwright-core");
const [base, bundle, weights = "q4"] = process.argv.slice(2);
const flags = ["--no-sandbox", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu"];
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: flags });
const page = await browser.newPage();
const logs = [];
page.on("console", (m) => logs.push(m.text()));
page.on("pageerror", (e) => logs.push(String(e)));
page.on("crash", () => logs.push("the page crashed"));
const out = { bundle, weights, ok: false };
const t0 = Date.now();
try {
  await page.goto(`${base}?backend=webgpu&weights=${weights}&bundle=${encodeURIComponent(bundle)}`);
  await page.waitForSelector('#status[data-status="ready"], #status[data-status="error"]', { timeout: 900_000 });
  out.load_s = (Date.now() - t0) / 1000;
  const status = await page.locator("#status").getAttribute("data-status");
  if (status === "ready") {
    out.placement = (await page.locator("#placement").innerText()).replace(/^ · /, "");
    const source = page.locator("#source");
    out.wasm_memory_bytes = Number(await source.getAttribute("data-wasm-memory"));
    out.gpu_bytes = Number(await source.getAttribute("data-gpu-bytes"));
    out.host_bytes = Number(await source.getAttribute("data-host-bytes"));
    const t1 = Date.now();
    // A short pair (about 20 tokens): SwiftShader computes a 2304-wide layer in about a minute per 40 tokens.
    await page.fill("#prompt", "Capital of France?");
    await page.fill("#answer-a", "Paris.");
    await page.fill("#answer-b", "Lyon, I think.");
    await page.click("#predict");
    await page.waitForSelector("#result, #predict-error", { timeout: 900_000 });
    out.first_pair_s = (Date.now() - t1) / 1000;
    if (await page.locator("#result").count()) {
      out.ok = true;
      out.p_a = Number(await page.locator("#result").getAttribute("data-pa"));
      // The same pair again: the button is disabled while the worker computes.
      const t2 = Date.now();
      await page.click("#predict");
      await page.waitForSelector("#predict[disabled]", { timeout: 10_000 }).catch(() => {});
      await page.waitForSelector("#predict:not([disabled])", { timeout: 900_000 });
      out.second_pair_s = (Date.now() - t2) / 1000;
    } else {
      out.error = await page.locator("#predict-error").innerText();
    }
  } else {
    out.error = await page.locator("#status").innerText();
  }
} catch (e) {
  out.error = `${String(e).split("\n")[0]} ${logs.slice(-3).join(" | ")}`;
}
console.log(JSON.stringify(out));
await browser.close();

// Kernel launches (compute dispatches) per prediction of the site on WebGPU, counted in the page's worker, for a
// built site and optionally a reference build side by side, with the ratio. The browser's analogue of
// bench/kernels.sh: a count depends on the build and the model's graph, not on the device, so SwiftShader here
// counts what a real GPU would launch.
//
//   node bench/browser_kernels.mjs                      # dist/ (trunk build --release)
//   node bench/browser_kernels.mjs dist /tmp/dist-old   # and another build's dist/ beside it
//
// Each site predicts its bundled example pairs (the demo model unless its bundle/ was replaced) twice over; every
// prediction after the first must launch the same number of kernels, or the script says so and fails.
import { resolve } from "node:path";
import { open, root, serve, waitReady } from "../web/browser-tests/lib/browser.mjs";

const dists = process.argv.slice(2).map((d) => resolve(d));
if (dists.length === 0) dists.push(`${root}dist`);
const mounts = Object.fromEntries(dists.map((d, i) => [`/site${i}/`, `${d}/`]));
const { server, base } = await serve(mounts);

// Dispatches per prediction of each example pair, in order, after the worker's first one (which also compiles).
async function count(url) {
  const { browser, page, logs } = await open(url, true);
  try {
    await waitReady(page, logs);
    const workers = page.workers();
    if (workers.length !== 1) throw new Error(`expected the model's one worker, found ${workers.length}`);
    const worker = workers[0];
    // wasm-bindgen's glue looks the method up on each call, so wrapping the prototype counts wgpu's dispatches.
    await worker.evaluate(() => {
      self.__dispatches = 0;
      for (const name of ["dispatchWorkgroups", "dispatchWorkgroupsIndirect"]) {
        const original = GPUComputePassEncoder.prototype[name];
        GPUComputePassEncoder.prototype[name] = function (...args) {
          self.__dispatches++;
          return original.apply(this, args);
        };
      }
    });
    const examples = await page.locator("button[data-example]").count();
    const counts = [];
    for (let round = 0; round < 2; round++) {
      for (let i = 0; i < examples; i++) {
        const before = await page.locator("#result .meta").innerText().catch(() => "");
        const n0 = await worker.evaluate(() => self.__dispatches);
        await page.click(`button[data-example="${i}"]`);
        await page.waitForFunction(
          (prev) => {
            const meta = document.querySelector("#result .meta");
            return meta && meta.innerText !== prev && !document.querySelector("#predict").disabled;
          },
          before,
          { timeout: 600_000 },
        );
        counts.push((await worker.evaluate(() => self.__dispatches)) - n0);
      }
    }
    const kernels = page.locator("#kernels");
    const fused = (await kernels.count()) ? await kernels.getAttribute("data-fused") : "not reported (an older build)";
    return { counts: counts.slice(1), fused };
  } finally {
    await browser.close();
  }
}

const rows = [];
for (let i = 0; i < dists.length; i++) {
  const { counts, fused } = await count(`${base}site${i}/index.html?backend=webgpu`);
  if (new Set(counts).size !== 1) {
    console.error(`${dists[i]}: predictions launched different numbers of kernels: ${counts.join(", ")}`);
    process.exitCode = 1;
  }
  rows.push({ dist: dists[i], per_prediction: Math.max(...counts), fused });
}
server.close();
console.log("kernel launches per prediction on WebGPU (the site's example pairs, SwiftShader)");
console.log(`  ${"build".padEnd(48)} ${"launches".padStart(8)}  fused`);
for (const r of rows) console.log(`  ${r.dist.padEnd(48)} ${String(r.per_prediction).padStart(8)}  ${r.fused}`);
if (rows.length > 1) {
  console.log(`  the first launches ${(rows[0].per_prediction / rows[1].per_prediction).toFixed(2)}x the second's kernels per prediction`);
}
console.log(JSON.stringify(rows));

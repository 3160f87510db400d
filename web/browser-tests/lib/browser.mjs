// What the browser tests share: a static server for dist/ and other directories under sub-paths, and headless
// Chromium (Debian's, driven by playwright-core) with or without WebGPU (SwiftShader here).
import { createServer } from "node:http";
import { createReadStream, existsSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { extname, join, normalize } from "node:path";

export const root = new URL("../../../", import.meta.url).pathname;
const require = createRequire(`${root}.cache/browser/`);
const { chromium } = require("playwright-core");

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

// Serves `mounts` (URL prefix → directory, the longest prefix first) and everything else from dist/. Files are
// streamed, so a bundle of hundreds of MB is never read whole.
export async function serve(mounts = {}) {
  const prefixes = Object.keys(mounts).sort((a, b) => b.length - a.length);
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const prefix = prefixes.find((p) => path.startsWith(p));
    const [dir, rel] = prefix ? [mounts[prefix], path.slice(prefix.length)] : [`${root}dist/`, path.slice(1) || "index.html"];
    const file = normalize(join(dir, rel));
    if (!file.startsWith(normalize(dir)) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream", "content-length": statSync(file).size });
    createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { server, base: `http://127.0.0.1:${server.address().port}/` };
}

const FLAGS = ["--no-sandbox", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic"];

export async function open(url, webgpu) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: webgpu ? [...FLAGS, "--enable-unsafe-webgpu"] : FLAGS,
  });
  const page = await browser.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(m.text()));
  page.on("pageerror", (e) => logs.push(String(e)));
  page.on("crash", () => logs.push("the page crashed"));
  await page.goto(url);
  return { browser, page, logs };
}

export async function waitReady(page, logs, timeout = 240_000) {
  try {
    await page.waitForSelector('#status[data-status="ready"]', { timeout });
  } catch (e) {
    throw new Error(`the app did not get ready: ${await page.locator("#status").innerText()}\n${logs.join("\n")}`);
  }
}

// Headless Chromium client: serves the page from a second origin, drives it with
// playwright-core, and reports like the other clients.
// Usage: node browser_client.mjs http://127.0.0.1:8080
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const serverUrl = process.argv[2];
const root = fileURLToPath(new URL("..", import.meta.url));
const types = { ".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript" };
const statics = createServer(async (req, res) => {
  const path = normalize(join(root, decodeURIComponent(new URL(req.url, "http://x").pathname)));
  if (!path.startsWith(root)) return res.writeHead(403).end();
  try {
    const body = await readFile(path);
    res.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" }).end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((resolve) => statics.listen(0, "127.0.0.1", resolve));
const pageOrigin = `http://127.0.0.1:${statics.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let exitCode = 1;
try {
  const page = await browser.newPage();
  page.on("console", (msg) => console.error(`[page] ${msg.text()}`));
  page.on("pageerror", (err) => console.error(`[page error] ${err}`));
  await page.goto(`${pageOrigin}/clients/browser/index.html?server=${encodeURIComponent(serverUrl)}`);
  const result = await page.evaluate(() => window.__session);
  if (!result.ok) throw new Error(result.error);
  console.log(`SESSION ${JSON.stringify(result.summary)} (page origin ${pageOrigin}, server ${serverUrl})`);
  console.log("READY");
  const { code, reason } = await page.evaluate(() => window.__closed);
  console.log(`CLOSE ${code} ${reason}`);
  exitCode = code === 1001 && reason === "server shutting down" ? 0 : 1;
} catch (error) {
  console.log(`ERROR ${error}`);
} finally {
  await browser.close();
  statics.close();
}
process.exit(exitCode);

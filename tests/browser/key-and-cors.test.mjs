// A chorus started with --api-key and --cors-origin (CHORUS_URL, key CHORUS_KEY, the
// allowed origin http://127.0.0.1:PAGE_PORT), in a real headless Chromium:
// 1. the chat page asks for the key after a 401, then the answer streams and Stop works;
// 2. the official `openai` JS SDK, loaded in a page of the allowed origin, streams a
//    chat completion across origins (its preflight carries `x-stainless-*` headers).

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { launch, sleep, stepper } from "./harness.mjs";

const BASE = process.env.CHORUS_URL ?? "http://127.0.0.1:8080";
const KEY = process.env.CHORUS_KEY ?? "test-key";
const PAGE_PORT = Number(process.env.PAGE_PORT ?? 8099);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const SDK_DIR = path.join(HERE, "node_modules", "openai");

// The other origin: a page and the SDK's ES modules, served as they are.
const PAGE = `<!doctype html><meta charset="utf-8"><title>sdk</title>
<script type="importmap">{"imports": {"openai/": "/openai/"}}</script>`;
const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://127.0.0.1:${PAGE_PORT}`);
  if (url.pathname === "/") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end(PAGE);
  }
  const file = path.normalize(path.join(SDK_DIR, url.pathname.replace(/^\/openai\//, "")));
  if (!url.pathname.startsWith("/openai/") || !file.startsWith(SDK_DIR)) {
    res.writeHead(404);
    return res.end();
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": "text/javascript" });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((resolve) => server.listen(PAGE_PORT, "127.0.0.1", resolve));

const browser = await launch();

const steps = [];
const step = stepper(steps);

async function running() {
  return (await (await fetch(`${BASE}/health`)).json()).running;
}

try {
  await step("after a 401 the page asks for the key; then the answer streams and Stop works", async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    let asked = 0;
    page.on("dialog", async (d) => { asked += 1; await d.accept(KEY); });
    await page.goto(BASE);
    await page.click("#toggle-settings");
    await page.fill("#set-max-tokens", "3000");
    await page.dispatchEvent("#set-max-tokens", "change");
    await page.fill("#input", "Write a very long story about dragons and castles.");
    await page.press("#input", "Enter");
    // The retried request's text shows as it streams (before the fix it was written
    // into an element the first request's clean-up had detached).
    const seen = new Set();
    const deadline = Date.now() + 120_000;
    while (seen.size < 3 && Date.now() < deadline) {
      const text = (await page.locator(".msg.assistant .content").last().textContent()) ?? "";
      if (text) seen.add(text);
      await sleep(20);
    }
    assert.equal(asked, 1, "the page should ask for the key once");
    assert.ok(seen.size >= 3, `the answer arrived in ${seen.size} update(s)`);
    assert.equal(await page.inputValue("#set-api-key"), KEY);
    assert.equal(await page.isEnabled("#stop"), true, "Stop is disabled while streaming");
    await page.click("#stop");
    await page.waitForFunction(
      () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish: stopped"),
    );
    const stopAt = Date.now() + 5000;
    while ((await running()) !== 0 && Date.now() < stopAt) await sleep(50);
    assert.equal(await running(), 0, "the server still runs the stopped request");
    assert.equal(await page.isEnabled("#send"), true);
    assert.deepEqual(errors, []);
    await context.close();
  });

  await step("the official openai SDK streams from another origin, and a wrong key is a 401", async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`http://127.0.0.1:${PAGE_PORT}/`);
    const result = await page.evaluate(async ({ base, key }) => {
      const { default: OpenAI } = await import("openai/index.mjs");
      const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key, dangerouslyAllowBrowser: true });
      const stream = await client.chat.completions.create({
        model: "", messages: [{ role: "user", content: "Say hello." }],
        max_tokens: 16, temperature: 0, stream: true,
      });
      let text = "", chunks = 0;
      for await (const chunk of stream) {
        chunks += 1;
        text += chunk.choices[0]?.delta?.content ?? "";
      }
      const wrong = new OpenAI({ baseURL: `${base}/v1`, apiKey: "wrong", dangerouslyAllowBrowser: true, maxRetries: 0 });
      let status = null;
      try {
        await wrong.models.list();
      } catch (e) {
        status = e.status ?? String(e);
      }
      return { text, chunks, status };
    }, { base: BASE, key: KEY });
    assert.ok(result.text.length > 0, JSON.stringify(result));
    assert.ok(result.chunks >= 3, JSON.stringify(result));
    assert.equal(result.status, 401, JSON.stringify(result));
    await context.close();
  });

  console.log(`all ${steps.length} key and CORS checks passed`);
} catch (e) {
  console.error(`not ok - ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}

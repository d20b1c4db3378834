// The live scheduler view (/scheduler) in a real headless Chromium against a real
// chorus (CHORUS_URL): while 16 streams run it shows 16 sequences whose bars advance and
// a KV strip that fills, then it drains to idle. SCREENSHOT_DIR, when set, receives a
// screenshot of it mid-run.

import assert from "node:assert/strict";
import { launch, sleep, stepper } from "./harness.mjs";

const BASE = process.env.CHORUS_URL ?? "http://127.0.0.1:8080";
const SHOTS = process.env.SCREENSHOT_DIR;
const STREAMS = 16;

const browser = await launch();
const steps = [];
const step = stepper(steps);

/** One streamed request, read to its end. */
async function stream(i) {
  const res = await fetch(`${BASE}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      messages: [{ role: "user", content: `Stream ${i}: tell me a long story about the sea.` }],
      max_tokens: 160, ignore_eos: true, temperature: 0.7, seed: i, stream: true,
    }),
  });
  assert.equal(res.status, 200);
  await res.text();
}

async function rows(page) {
  return page.$$eval("#seqs tr", (trs) => trs.map((tr) => ({
    request: tr.dataset.request, generated: Number(tr.dataset.generated),
  })));
}

try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await step("the view connects and shows the idle engine", async () => {
    await page.goto(`${BASE}/scheduler`);
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("live"));
    await page.locator("#idle").waitFor();
  });

  const running = Array.from({ length: STREAMS }, (_, i) => stream(i));

  await step(`${STREAMS} streams show as ${STREAMS} sequences whose bars advance`, async () => {
    await page.waitForFunction((n) => document.querySelectorAll("#seqs tr").length === n, STREAMS, { timeout: 60_000 });
    const before = await rows(page);
    await page.waitForFunction(() => [...document.querySelectorAll("#seqs tr")]
      .some((tr) => tr.querySelector(".state").textContent === "decode"), null, { timeout: 60_000 });
    await sleep(1500);
    const after = await rows(page);
    const grew = after.filter((r) => {
      const b = before.find((x) => x.request === r.request);
      return b && r.generated > b.generated;
    });
    assert.ok(grew.length >= STREAMS / 2, `only ${grew.length} bars advanced`);
    for (const r of after) assert.match(r.request, /^[0-9a-f]{32}$/, "a row is named by its request id only");
    const text = await page.locator("#seqs").textContent();
    assert.ok(!text.includes("story"), "prompt text appeared in the view");
  });

  await step("the KV strip fills, with a text alternative", async () => {
    const used = Number(await page.textContent("#kv-used"));
    assert.ok(used >= STREAMS, `only ${used} blocks in use`);
    const label = await page.getAttribute("#kv", "aria-label");
    assert.match(label, /KV cache: \d+ of \d+ blocks in use/);
    const steps = await page.textContent("#steps-text");
    assert.match(steps, /last step [\d.]+ ms/);
  });

  await step("at 360 px the running sequences' rows fit the screen", async () => {
    await page.setViewportSize({ width: 360, height: 740 });
    await sleep(300);
    assert.ok((await page.locator("#seqs tr").count()) > 0, "no rows to measure");
    const wider = await page.evaluate(() => {
      const rows = document.querySelector(".rows");
      return [document.documentElement.scrollWidth - window.innerWidth, rows.scrollWidth - rows.clientWidth];
    });
    assert.ok(wider.every((px) => px <= 1), `page and rows are ${wider} px wider than the screen`);
    await page.setViewportSize({ width: 1100, height: 900 });
  });

  if (SHOTS) {
    await step("screenshot", async () => {
      await page.screenshot({ path: `${SHOTS}/screenshot-scheduler.png`, fullPage: true });
    });
  }

  await step("when the streams end, the view drains to idle", async () => {
    await Promise.all(running);
    await page.locator("#idle").waitFor({ timeout: 30_000 });
    assert.equal(await page.locator("#seqs tr").count(), 0);
    await page.waitForFunction(() => document.getElementById("kv-used").textContent === "0", null, { timeout: 10_000 });
  });

  await step("readable at 360 px", async () => {
    await page.setViewportSize({ width: 360, height: 740 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `the page is ${overflow} px wider than the screen`);
  });

  assert.deepEqual(errors, [], "errors on the page");
  console.log(`all ${steps.length} scheduler view checks passed`);
} catch (e) {
  console.error(`not ok - ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

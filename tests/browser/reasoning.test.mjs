// The chat page against a thinking model (CHORUS_URL: chorus with the thinking template
// of tests/sdk/templates/): the reasoning streams into a block of its own, folded away
// once the answer has come, kept across a reload, and sent back with its answer.

import assert from "node:assert/strict";
import { launch, stepper } from "./harness.mjs";

const BASE = process.env.CHORUS_URL ?? "http://127.0.0.1:8080";

const browser = await launch();
const steps = [];
const step = stepper(steps);

// Two answers that reasoned "abc" and said "Done.": greedy decoding copies the pattern.
const turn = (i) => [
  { role: "user", content: "Say done." },
  { role: "assistant", content: "Done.", reasoning: "abc", stats: { tokens: 10, finish: "stop" } },
].map((m) => ({ ...m, id: i }));
const conversation = { id: "c1", title: "Thinking", messages: [...turn(0), ...turn(1)] };

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.addInitScript((conv) => {
    if (!localStorage.getItem("chorus.conversations")) {
      localStorage.setItem("chorus.conversations", JSON.stringify([conv]));
      localStorage.setItem("chorus.current", JSON.stringify(conv.id));
      localStorage.setItem("chorus.settings", JSON.stringify({ temperature: "0", max_tokens: "40" }));
    }
  }, conversation);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(BASE);

  await step("earlier answers show their reasoning folded, and send it back", async () => {
    assert.equal(await page.locator(".msg.assistant details.reasoning").count(), 2);
    assert.equal(await page.locator("details.reasoning[open]").count(), 0);
    const sent = new Promise((resolve) => {
      page.on("request", (req) => {
        if (req.url().endsWith("/v1/chat/completions")) resolve(JSON.parse(req.postData()));
      });
    });
    await page.fill("#input", "Say done.");
    await page.press("#input", "Enter");
    const body = await sent;
    const answers = body.messages.filter((m) => m.role === "assistant");
    assert.deepEqual(answers.map((m) => m.reasoning_content), ["abc", "abc"]);
  });

  await step("a new answer's reasoning streams into its own block, apart from the answer", async () => {
    await page.waitForFunction(
      () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish:"),
      null, { timeout: 120_000 },
    );
    const last = page.locator(".msg.assistant").last();
    assert.equal(await last.locator("details.reasoning div").textContent(), "abc");
    assert.equal(await last.locator("details.reasoning[open]").count(), 0, "not folded once answered");
    assert.equal((await last.locator(".content").textContent()).trim(), "Done.");
  });

  await step("the reasoning is kept across a reload", async () => {
    await page.reload();
    const last = page.locator(".msg.assistant").last();
    await last.waitFor();
    assert.equal(await last.locator("details.reasoning div").textContent(), "abc");
  });

  assert.deepEqual(errors, [], "errors on the page");
  console.log(`all ${steps.length} browser checks passed`);
} catch (e) {
  console.error(`not ok - ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

// The chat page in a real headless Chromium against a real chorus (CHORUS_URL):
// streaming, stats, Stop, persistence across reloads, safe rendering, keyboard use.
// SCREENSHOT_DIR, when set, receives desktop and phone screenshots.

import assert from "node:assert/strict";
import { launch, sleep, stepper } from "./harness.mjs";

const BASE = process.env.CHORUS_URL ?? "http://127.0.0.1:8080";
const MODEL = process.env.CHORUS_MODEL ?? "smollm2-135m-instruct";
const SHOTS = process.env.SCREENSHOT_DIR;

const browser = await launch();

const steps = [];
const step = stepper(steps);

const lastAnswer = (page) => page.locator(".msg.assistant .content").last();
const lastStats = (page) => page.locator(".msg.assistant .stats").last();

async function health() {
  return (await fetch(`${BASE}/health`)).json();
}

/** The body of the next chat request `page` sends. */
async function nextChatBody(page) {
  return JSON.parse(await nextChatText(page));
}

/** The raw body text of the next chat request `page` sends (JSON.parse would round
 *  its large integers). */
function nextChatText(page) {
  return new Promise((resolve) => {
    const seen = (req) => {
      if (req.method() === "POST" && req.url().endsWith("/v1/chat/completions")) {
        page.off("request", seen);
        resolve(req.postData());
      }
    };
    page.on("request", seen);
  });
}

/** Waits until the last answer on `page` has its stats line. */
async function answered(page) {
  await page.waitForFunction(
    () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish:"),
    null, { timeout: 120_000 },
  );
}

async function setField(page, id, value) {
  if (await page.locator("#settings").isHidden()) await page.click("#toggle-settings");
  await page.fill(`#${id}`, String(value));
  await page.dispatchEvent(`#${id}`, "change");
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await step("the page loads and names the served model", async () => {
    await page.goto(BASE);
    await page.waitForFunction(() => document.getElementById("model").textContent.length > 0);
    assert.equal(await page.textContent("#model"), MODEL);
  });

  await step("Shift+Enter makes a new line, Enter sends", async () => {
    await page.focus("#input");
    await page.keyboard.type("Hello");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("there");
    assert.equal(await page.inputValue("#input"), "Hello\nthere");
    assert.equal(await page.locator(".msg.user").count(), 0, "Shift+Enter must not send");
    await page.fill("#input", "");
  });

  await step("an answer streams in over several updates and ends with a stats line", async () => {
    await setField(page, "set-max-tokens", 48);
    await setField(page, "set-temperature", 0);
    await page.fill("#input", "Write a short poem about the sea.");
    const sent = nextChatBody(page);
    await page.press("#input", "Enter");
    // The conversation as shown, ending with the question: not with the empty answer
    // the page is about to fill in (the model would answer another conversation).
    assert.deepEqual((await sent).messages, [{ role: "user", content: "Write a short poem about the sea." }]);
    const seen = new Set();
    const deadline = Date.now() + 120_000;
    while (Date.now() < deadline) {
      const text = (await lastAnswer(page).textContent()) ?? "";
      if (text) seen.add(text);
      if ((await lastStats(page).textContent())?.includes("finish:")) break;
      await sleep(10);
    }
    const stats = await lastStats(page).textContent();
    assert.match(stats, /\d+ tokens · TTFT \d+ ms · [\d.]+ tok\/s · finish: (stop|length)/);
    assert.ok(seen.size >= 2, `text arrived in ${seen.size} update(s)`);
    assert.equal(await page.isEnabled("#send"), true);
  });

  await step("a seed past 2^53 is sent as typed, and the largest one is served", async () => {
    await setField(page, "set-max-tokens", 4);
    for (const seed of ["9007199254740993", "9223372036854775807"]) {
      await setField(page, "set-seed", seed);
      await page.fill("#input", "Hi");
      const sent = nextChatText(page);
      await page.press("#input", "Enter");
      assert.ok((await sent).includes(`"seed":${seed}}`), await sent);
      await answered(page);
      assert.match(await lastStats(page).textContent(), /finish: (stop|length)/);
    }
    await setField(page, "set-seed", "");
  });

  await step("a stream closed without [DONE] is marked interrupted", async () => {
    const cut = 'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"Half an"},"finish_reason":null}]}\n\n';
    await page.route("**/v1/chat/completions", (route) =>
      route.fulfill({ status: 200, contentType: "text/event-stream", body: cut }));
    await page.fill("#input", "Hi");
    await page.press("#input", "Enter");
    await answered(page);
    assert.equal(await lastAnswer(page).textContent(), "Half an");
    assert.match(await lastStats(page).textContent(), /finish: interrupted/);
    await page.unroute("**/v1/chat/completions");
  });

  await step("Stop ends a long answer and the server frees the sequence", async () => {
    await setField(page, "set-max-tokens", 3000);
    await page.fill("#input", "Write a very long story about dragons and castles.");
    await page.click("#send");
    await page.waitForFunction(
      () => (document.querySelector(".msg.assistant:last-child .content")?.textContent ?? "").length > 20,
      null, { timeout: 120_000 },
    );
    assert.equal(await page.isEnabled("#stop"), true);
    await page.click("#stop");
    await page.waitForFunction(
      () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish: stopped"),
    );
    // No usage arrives for a stopped answer: its count is the page's own, and says so.
    assert.match(await lastStats(page).textContent(), /^≈\d+ tokens · TTFT \d+ ms/);
    const text = await lastAnswer(page).textContent();
    await sleep(500);
    assert.equal(await lastAnswer(page).textContent(), text, "text kept growing after Stop");
    assert.equal(await page.isEnabled("#send"), true);
    const deadline = Date.now() + 5000;
    let h = await health();
    while (h.running !== 0 && Date.now() < deadline) { await sleep(50); h = await health(); }
    assert.equal(h.running, 0, `server still running: ${JSON.stringify(h)}`);
    assert.equal(await page.evaluate(() => document.activeElement.id), "input", "focus was lost with Stop");
  });

  await step("a refused request is shown in the conversation with a Retry that works", async () => {
    await setField(page, "set-max-tokens", 0);
    await page.fill("#input", "Say hello.");
    await page.press("#input", "Enter");
    const error = page.locator(".msg.error .content");
    await error.waitFor();
    assert.match(await error.textContent(), /max_tokens/);
    await setField(page, "set-max-tokens", 8);
    await page.locator(".msg.error button", { hasText: "Retry" }).click();
    await page.waitForFunction(
      () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish:"),
      null, { timeout: 120_000 },
    );
    assert.equal(await page.locator(".msg.error").count(), 0);
  });

  await step("an older error has no Retry, and its question is not sent again", async () => {
    await setField(page, "set-max-tokens", 0);
    await page.fill("#input", "A question that fails.");
    await page.press("#input", "Enter");
    await page.locator(".msg.error").waitFor();
    await setField(page, "set-max-tokens", 8);
    await page.fill("#input", "Say hi.");
    const sent = nextChatBody(page);
    await page.press("#input", "Enter");
    const messages = (await sent).messages;
    await answered(page);
    assert.equal(await page.locator(".msg.error button").count(), 0, "an old error kept its Retry");
    assert.ok(!messages.some((m) => m.content === "A question that fails."), JSON.stringify(messages));
    assert.deepEqual(messages.at(-1), { role: "user", content: "Say hi." });
    messages.slice(1).forEach((m, i) => assert.notEqual(m.role, messages[i].role, JSON.stringify(messages)));
  });

  await step("scrolled up, a streaming answer leaves the view where the reader put it", async () => {
    await setField(page, "set-max-tokens", 400);
    await page.click("#new-chat");
    await page.fill("#input", "Write a very long story about a lighthouse keeper.");
    await page.press("#input", "Enter");
    await page.waitForFunction(() => {
      const box = document.getElementById("messages");
      return box.scrollHeight > box.clientHeight + 100;
    }, null, { timeout: 120_000 });
    await page.mouse.move(640, 300);
    await page.mouse.wheel(0, -5000);
    await page.waitForFunction(() => document.getElementById("messages").scrollTop < 10);
    const length = (await lastAnswer(page).textContent()).length;
    await page.waitForFunction(
      (n) => (document.querySelector(".msg.assistant:last-child .content")?.textContent ?? "").length > n + 40,
      length, { timeout: 120_000 },
    );
    assert.ok(await page.evaluate(() => document.getElementById("messages").scrollTop) < 10, "the view was pulled down");
    await page.click("#stop");
    await answered(page);
  });

  await step("a question asked in another tab while an answer streams here is kept; this answer too, as a copy", async () => {
    await setField(page, "set-max-tokens", 120);
    await page.click("#new-chat");
    await page.fill("#input", "Tell me about the moon.");
    await page.press("#input", "Enter");
    await answered(page);
    const other = await context.newPage();
    await other.goto(BASE);
    await other.locator(".msg.user", { hasText: "Tell me about the moon." }).waitFor();
    await setField(page, "set-max-tokens", 400);
    await page.fill("#input", "Now write a very long story about the moon.");
    await page.press("#input", "Enter");
    await page.waitForFunction(
      () => (document.querySelector(".msg.assistant:last-child .content")?.textContent ?? "").length > 10,
      null, { timeout: 120_000 },
    );
    // The other tab, not answering, shows this tab's saves, and asks there meanwhile.
    await other.locator(".msg.user", { hasText: "Now write a very long story" }).waitFor();
    assert.ok(await page.isEnabled("#stop"), "the answer here ended before the other tab asked");
    await setField(other, "set-max-tokens", 8);
    await other.fill("#input", "Say hi from the other tab.");
    await other.press("#input", "Enter");
    await answered(other);
    if (await page.isEnabled("#stop")) await page.click("#stop");
    await answered(page);
    const stored = await page.evaluate(() => JSON.parse(localStorage.getItem("chorus.conversations")));
    const theirs = stored.find((c) => c.title === "Tell me about the moon.");
    const mine = stored.find((c) => c.title === "Tell me about the moon. (copy)");
    assert.ok(theirs && mine, JSON.stringify(stored.map((c) => c.title)));
    assert.ok(theirs.messages.some((m) => m.content === "Say hi from the other tab."), JSON.stringify(theirs.messages));
    assert.equal(mine.messages.at(-2).content, "Now write a very long story about the moon.");
    assert.ok(mine.messages.at(-1).content.length > 10);
    assert.equal(await page.locator("#conversations button[aria-current=true]").textContent(), "Tell me about the moon. (copy)");
    await other.close();
  });

  await step("a conversation past the model's context offers to ask in a new chat", async () => {
    await setField(page, "set-max-tokens", 8);
    // A history longer than either test model's context (2,048 and 32,768 tokens).
    await page.evaluate(() => {
      const convs = JSON.parse(localStorage.getItem("chorus.conversations"));
      convs.unshift({ id: "full", title: "A full conversation", rev: 1, messages: [
        { role: "user", content: "Count." }, { role: "assistant", content: "one two three ".repeat(15000) }] });
      localStorage.setItem("chorus.conversations", JSON.stringify(convs));
      localStorage.setItem("chorus.current", JSON.stringify("full"));
    });
    await page.reload();
    await page.fill("#input", "Say hi.");
    await page.press("#input", "Enter");
    const error = page.locator(".msg.error .content");
    await error.waitFor({ timeout: 120_000 });
    assert.match(await error.textContent(), /context.*ask in a new chat/s);
    await page.locator(".msg.error button", { hasText: "Ask in a new chat" }).click();
    await answered(page);
    assert.equal(await page.locator(".msg").count(), 2);
    assert.equal(await page.locator(".msg.user .content").textContent(), "Say hi.");
    assert.equal(await page.locator("#conversations button[aria-current=true]").textContent(), "Say hi.");
  });

  await step("two tabs keep each other's conversations", async () => {
    const other = await context.newPage();
    await other.goto(BASE);
    await page.click("#new-chat");
    await page.fill("#input", "Alpha from the first tab.");
    await page.press("#input", "Enter");
    await answered(page);
    await other.click("#new-chat");
    await other.fill("#input", "Beta from the second tab.");
    await other.press("#input", "Enter");
    await answered(other);
    await page.reload();
    const titles = await page.locator("#conversations button").allTextContents();
    assert.ok(titles.includes("Alpha from the first tab."), JSON.stringify(titles));
    assert.ok(titles.includes("Beta from the second tab."), JSON.stringify(titles));
    await other.close();
  });

  await step("New chat twice makes one empty conversation, not two", async () => {
    const before = await page.locator("#conversations li").count();
    await page.click("#new-chat");
    await page.click("#new-chat");
    assert.equal(await page.locator("#conversations li").count(), before + 1);
  });

  await step("a deleted conversation is gone, and another tab does not save it back", async () => {
    const other = await context.newPage();
    await other.goto(BASE);
    const title = "Beta from the second tab.";
    await other.locator("#conversations button", { hasText: title }).waitFor();
    page.once("dialog", (d) => d.accept());
    await page.getByRole("button", { name: `Delete conversation: ${title}` }).click();
    await page.waitForFunction((t) => ![...document.querySelectorAll("#conversations li")].some((li) => li.textContent.includes(t)), title);
    // The other tab drops it too, and its next save does not bring it back.
    await other.waitForFunction((t) => ![...document.querySelectorAll("#conversations li")].some((li) => li.textContent.includes(t)), title);
    await other.click("#new-chat");
    await other.fill("#input", "Gamma from the second tab.");
    await other.press("#input", "Enter");
    await answered(other);
    await page.reload();
    const titles = await page.locator("#conversations li").allTextContents();
    assert.ok(!titles.some((t) => t.includes(title)), JSON.stringify(titles));
    assert.ok(titles.some((t) => t.includes("Gamma from the second tab.")), JSON.stringify(titles));
    // Dismissing the question deletes nothing.
    const count = titles.length;
    page.once("dialog", (d) => d.dismiss());
    await page.locator("#conversations .delete").first().click();
    assert.equal(await page.locator("#conversations li").count(), count);
    await other.close();
  });

  await step("after a reload the conversation is in the sidebar and shown again", async () => {
    await page.reload();
    const item = page.locator("#conversations button", { hasText: "Write a short poem about the sea." });
    await item.waitFor();
    await item.click();
    assert.ok((await page.locator(".msg.user").count()) >= 2);
    assert.ok((await lastAnswer(page).textContent()).length > 0);
  });

  if (SHOTS) {
    await step("desktop screenshot", async () => {
      await page.screenshot({ path: `${SHOTS}/screenshot-desktop.png` });
    });
  }

  await step("a reply containing HTML is shown as text, never run", async () => {
    const payload = 'Here: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> ```\n<b>code</b>\n```';
    await page.evaluate((content) => {
      const convs = JSON.parse(localStorage.getItem("chorus.conversations") || "[]");
      convs.unshift({
        id: "xss", title: "html reply",
        messages: [{ role: "user", content: "show me html" }, { role: "assistant", content, stats: null }],
      });
      localStorage.setItem("chorus.conversations", JSON.stringify(convs));
      localStorage.setItem("chorus.current", JSON.stringify("xss"));
    }, payload);
    await page.reload();
    await page.locator(".msg.assistant .content").first().waitFor();
    const shown = await page.locator("#messages").textContent();
    assert.ok(shown.includes('<img src=x onerror="window.__xss=1">'), shown);
    assert.ok(shown.includes("<b>code</b>"));
    assert.equal(await page.locator("#messages img, #messages script, #messages b").count(), 0);
    await sleep(200);
    assert.equal(await page.evaluate(() => window.__xss), undefined);
  });

  await step("a function call in a reply is a labelled block of text", async () => {
    await page.evaluate(() => {
      const convs = JSON.parse(localStorage.getItem("chorus.conversations") || "[]");
      convs.unshift({
        id: "tool", title: "tool reply",
        messages: [
          { role: "user", content: "weather?" },
          { role: "assistant", content: "", stats: null,
            toolCalls: [{ name: "get_weather", arguments: '{"city": "<b>Paris</b>"}' }] },
        ],
      });
      localStorage.setItem("chorus.conversations", JSON.stringify(convs));
      localStorage.setItem("chorus.current", JSON.stringify("tool"));
    });
    await page.reload();
    const block = page.locator(".msg.assistant .tool-call").first();
    await block.waitFor();
    assert.equal(await block.locator(".label").textContent(), "Tool call: get_weather");
    assert.equal(await block.locator("code").textContent(), '{"city": "<b>Paris</b>"}');
    assert.equal(await page.locator("#messages b").count(), 0);
  });

  await step("a numbered list keeps the model's numbers", async () => {
    await page.evaluate(() => {
      const convs = JSON.parse(localStorage.getItem("chorus.conversations") || "[]");
      convs.unshift({
        id: "list", title: "list reply",
        messages: [{ role: "user", content: "steps?" },
          { role: "assistant", content: "3. three\n4. four\n\n5. five", stats: null }],
      });
      localStorage.setItem("chorus.conversations", JSON.stringify(convs));
      localStorage.setItem("chorus.current", JSON.stringify("list"));
    });
    await page.reload();
    await page.locator(".msg.assistant ol").first().waitFor();
    assert.deepEqual(await page.locator(".msg.assistant ol").evaluateAll((ls) => ls.map((l) => l.start)), [3, 5]);
  });

  await step("stored data of another shape is dropped, not a broken page", async () => {
    const stored = await page.evaluate(() => localStorage.getItem("chorus.conversations"));
    for (const bad of ['{}', '"hello"', '[null, {"id": "x", "title": 5, "messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "ok", "stats": {"tps": "fast"}}]}]']) {
      await page.evaluate((v) => { localStorage.setItem("chorus.conversations", v); localStorage.setItem("chorus.settings", '"hello"'); }, bad);
      await page.reload();
      await page.waitForFunction(() => document.getElementById("messages").childElementCount > 0);
      assert.deepEqual(errors, [], `with ${bad} stored`);
    }
    await page.evaluate((v) => { localStorage.setItem("chorus.conversations", v); localStorage.removeItem("chorus.settings"); }, stored);
    await page.reload();
  });

  await step("a browser that refuses to store says so, and the answer still shows", async () => {
    assert.equal(await page.isHidden("#storage-warning"), true);
    await page.evaluate(() => {
      window.realSetItem = Storage.prototype.setItem;
      Storage.prototype.setItem = () => { throw new DOMException("full", "QuotaExceededError"); };
    });
    await page.click("#new-chat");
    await page.fill("#input", "Say hello.");
    await page.click("#send");
    await answered(page);
    assert.equal(await page.isVisible("#storage-warning"), true);
    assert.match(await page.textContent("#storage-warning"), /lost on a reload/);
    assert.ok((await lastAnswer(page).textContent()).length > 0);
    // Room again: the next save succeeds and the warning goes.
    await page.evaluate(() => { Storage.prototype.setItem = window.realSetItem; });
    await page.fill("#input", "And goodbye.");
    await page.click("#send");
    await answered(page);
    assert.equal(await page.isHidden("#storage-warning"), true);
    assert.deepEqual(errors, []);
  });

  await step("keyboard only: Tab reaches the controls with a visible focus ring", async () => {
    await page.focus("#input");
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => document.activeElement.id);
    assert.equal(focused, "send");
    const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
    assert.notEqual(outline, "none");
    // Choosing a conversation draws the page again; the focus stays on its button.
    const item = page.locator("#conversations button:not(.delete)").nth(1);
    await item.focus();
    await page.keyboard.press("Enter");
    assert.match(await page.evaluate(() => document.activeElement.dataset.focusKey ?? ""), /^conversation-/);
  });

  await step("works at 360 px wide", async () => {
    const phone = await browser.newContext({ viewport: { width: 360, height: 740 }, isMobile: true });
    const p = await phone.newPage();
    await p.goto(BASE);
    await p.waitForFunction(() => document.getElementById("model").textContent.length > 0);
    for (const id of ["new-chat", "toggle-settings", "input", "send", "stop"]) {
      const box = await p.locator(`#${id}`).boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= 360, `#${id} is off screen: ${JSON.stringify(box)}`);
    }
    // The settings fit the width too (their number fields kept their natural width).
    await p.click("#toggle-settings");
    assert.ok(await p.evaluate(() => document.documentElement.scrollWidth) <= 360, "settings wider than the screen");
    for (const id of ["set-temperature", "set-top-p", "set-max-tokens", "set-seed", "set-api-key"]) {
      const box = await p.locator(`#${id}`).boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= 360, `#${id} is off screen: ${JSON.stringify(box)}`);
    }
    await p.click("#toggle-settings");
    const composer = await p.locator("#composer").boundingBox();
    assert.ok(composer.y + composer.height >= 740 - 2, `the composer is not at the bottom: ${JSON.stringify(composer)}`);
    await p.fill("#input", "Hi!");
    await p.press("#input", "Enter");
    await p.waitForFunction(
      () => document.querySelector(".msg.assistant:last-child .stats")?.textContent.includes("finish:"),
      null, { timeout: 120_000 },
    );
    if (SHOTS) await p.screenshot({ path: `${SHOTS}/screenshot-phone.png` });
    await phone.close();
  });

  assert.deepEqual(errors, [], "errors on the page");
  console.log(`all ${steps.length} browser checks passed`);
} catch (e) {
  console.error(`not ok - ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

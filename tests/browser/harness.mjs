// What the browser tests share: Chromium launched headless with the flags these machines
// need, and named steps that print TAP-style lines.

import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

export function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs `fn` as a named check and records it in `done`. */
export function stepper(done) {
  return async function step(name, fn) {
    const t = Date.now();
    await fn();
    done.push(name);
    console.log(`ok - ${name} (${Date.now() - t} ms)`);
  };
}

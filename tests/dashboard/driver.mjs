// A remote control for the dashboard in the system Chromium, for the Rust
// integration tests (tests/it/dashboard.rs): one JSON command per stdin line,
// one JSON reply per stdout line. The tests decide what to do; this only
// drives the page.
//
//   node tests/dashboard/driver.mjs <base url> <screenshot dir>
//   → {"op":"goto","path":"/"}            ← {"ok":true}
//   → {"op":"fill","sel":"#token","text":"…"}
//   → {"op":"click","sel":"#sign-in"}
//   → {"op":"wait","sel":"#connection.live","state":"visible","timeout":10000}
//   → {"op":"text","sel":"#role"}         ← {"ok":true,"value":"read-only"}
//   → {"op":"count","sel":"#tab-push"}    ← {"ok":true,"value":0}
//   → {"op":"eval","js":"…"}              ← {"ok":true,"value":…}
//   → {"op":"screenshot","name":"fleet"}  ← {"ok":true,"value":"<dir>/fleet.png"}
//   → {"op":"select","sel":"#filter-state","value":"5"}
//   → {"op":"tab","index":1}             (switch to tab 1, opening it on the base url if new)
//   → {"op":"reload"}
//   → {"op":"close"}
// Errors come back as {"ok":false,"error":"…"}; the browser's console errors
// and page errors are printed to stderr.

import { createInterface } from "node:readline";
import { existsSync, mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, shots] = process.argv.slice(2);
const CHROMIUM = process.env.AGENTHUB_CHROMIUM || "/usr/bin/chromium";

let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch {
  fail("playwright-core is not installed: run scripts/test-deps.sh");
}

// A fresh, throwaway profile; in memory where possible, so that the browser's
// own disk writes do not stall it on a busy machine.
const profileRoot = existsSync("/dev/shm") ? "/dev/shm" : tmpdir();
const profile = mkdtempSync(join(profileRoot, "agenthub-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 850 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
} catch (e) {
  fail(`cannot start ${CHROMIUM} (run scripts/test-deps.sh): ${e.message}`);
}
const watch = (p, n) => {
  p.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") console.error(`[tab ${n} ${m.type()}] ${m.text()}`);
  });
  p.on("pageerror", (e) => console.error(`[tab ${n} error] ${e.message}`));
  return p;
};
/** Every tab opened, in order; commands go to `page`. */
const tabs = [watch(context.pages()[0] ?? (await context.newPage()), 0)];
let page = tabs[0];
mkdirSync(shots, { recursive: true });

const ops = {
  goto: (c) => page.goto(new URL(c.path ?? "/", base).toString()).then(() => undefined),
  fill: (c) => page.fill(c.sel, c.text),
  click: (c) => page.click(c.sel, { timeout: c.timeout ?? 5000 }),
  select: (c) => page.selectOption(c.sel, c.value).then(() => undefined),
  press: (c) => page.press(c.sel, c.key),
  wait: (c) => page.waitForSelector(c.sel, { state: c.state ?? "visible", timeout: c.timeout ?? 10000 }).then(() => undefined),
  text: (c) => page.textContent(c.sel, { timeout: c.timeout ?? 5000 }),
  count: (c) => page.locator(c.sel).count(),
  eval: (c) => page.evaluate(c.js),
  reload: (c) => page.reload().then(() => undefined),
  tab: async (c) => {
    if (c.index === tabs.length) {
      tabs.push(watch(await context.newPage(), c.index));
      await tabs[c.index].goto(new URL("/", base).toString());
    }
    if (!tabs[c.index]) throw new Error(`no tab ${c.index}`);
    page = tabs[c.index];
  },
  screenshot: async (c) => {
    const path = join(shots, `${c.name}.png`);
    await page.screenshot({ path });
    return path;
  },
  close: async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  let reply;
  try {
    const f = ops[cmd.op];
    if (!f) throw new Error(`unknown op ${cmd.op}`);
    reply = { ok: true, value: (await f(cmd)) ?? null };
  } catch (e) {
    reply = { ok: false, error: String(e.message ?? e).split("\n").slice(0, 6).join("\n") };
  }
  process.stdout.write(`${JSON.stringify(reply)}\n`);
  if (cmd.op === "close") break;
}
await context.close().catch(() => undefined);
rmSync(profile, { recursive: true, force: true });
process.exit(0);

function fail(message) {
  process.stdout.write(`${JSON.stringify({ ok: false, error: message })}\n`);
  process.exit(1);
}

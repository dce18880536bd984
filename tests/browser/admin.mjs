// The status page in a real browser: Playwright (playwright-core) driving Debian's Chromium.
// Run by tests/admin_page.rs against a live service; every step leaves a screenshot in
// $SHOTS_DIR. Exits non-zero (with the reason) at the first step that does not hold.
//
// Env: BASE_URL, ADMIN_KEY, SERVICE_KEY, SHOTS_DIR, MCP_POOL_TEST_PLAYWRIGHT (the
// playwright-core directory), MCP_POOL_TEST_CHROMIUM, PATIENCE_MS.
import { createRequire } from "node:module";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("BASE_URL");
const adminKey = env("ADMIN_KEY");
const serviceKey = env("SERVICE_KEY");
const shots = env("SHOTS_DIR");
const patience = Number(process.env.PATIENCE_MS || 30000);
const require = createRequire(path.join(env("MCP_POOL_TEST_PLAYWRIGHT"), "package.json"));
const { chromium } = require("playwright-core");

const USER = "dora";

async function rest(method, route, body) {
  const response = await fetch(`${base}${route}`, {
    method,
    headers: {
      Authorization: `Bearer ${serviceKey}`,
      "X-User-Id": USER,
      "Content-Type": "application/json",
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${route}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const browser = await chromium.launch({
  executablePath: env("MCP_POOL_TEST_CHROMIUM"),
  headless: true,
  // As root in a machine with no network but loopback (see the environment notes).
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let step = 0;
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
page.setDefaultTimeout(patience);
const shot = async (name) => {
  step += 1;
  await page.screenshot({ path: path.join(shots, `${String(step).padStart(2, "0")}-${name}.png`), fullPage: true });
};
const row = () => page.locator(`#sessions tr[data-user="${USER}"][data-server="demo"]`);
const readyRow = () => page.locator(`#sessions tr[data-user="${USER}"][data-server="demo"][data-state="ready"]`);

try {
  await page.goto(`${base}/admin`);
  await page.locator("#admin-key").waitFor();
  await shot("login");

  // A wrong key is refused, and the dashboard stays hidden.
  await page.fill("#admin-key", "not-the-admin-key");
  await page.click("#login-form button[type=submit]");
  await page.locator("#login-error", { hasText: "refused" }).waitFor();
  if (await page.locator("#dashboard").isVisible()) throw new Error("dashboard shown for a wrong key");
  await shot("wrong-key-refused");

  await page.fill("#admin-key", adminKey);
  await page.click("#login-form button[type=submit]");
  await page.locator("#dashboard").waitFor();
  await page.locator("#live.on").waitFor();
  await shot("signed-in");

  // A tool call over REST: the session appears, ready.
  await rest("PUT", "/v1/connections/demo", { access_token: "dora-token" });
  const echoed = await rest("POST", "/v1/connections/demo/tools/echo/call", { message: "hi" });
  if (echoed.content[0].text !== "hi") throw new Error(`echo: ${JSON.stringify(echoed)}`);
  await readyRow().waitFor();
  await page.locator("#events li.started", { hasText: USER }).first().waitFor();
  await shot("session-after-rest-call");

  // kill -9 of its child: the crash shows in the feed, then the restart.
  const pid = Number(await row().locator("td.pid").textContent());
  if (!(pid > 1)) throw new Error(`no pid in the row: ${pid}`);
  process.kill(pid, "SIGKILL");
  await page.locator("#events li.crashed", { hasText: USER }).first().waitFor();
  await page.locator("#events li.started", { hasText: "restart" }).first().waitFor();
  // The table follows the feed (a refresh after each event): wait for the restarted row.
  await page.locator(`#sessions tr[data-user="${USER}"][data-state="ready"][data-restarts="1"]`).waitFor();
  const newPid = Number(await row().locator("td.pid").textContent());
  if (newPid === pid) throw new Error("the same pid after a restart");
  await shot("crash-and-restart");

  // Close it from the page: it goes.
  await row().getByRole("button", { name: "Close", exact: true }).click();
  await row().waitFor({ state: "detached" });
  await page.locator("#events li.closed", { hasText: USER }).first().waitFor();
  await shot("closed-from-the-page");

  // Nothing on the page shows a key or a token.
  const html = await page.content();
  for (const secret of [adminKey, serviceKey, "dora-token"]) {
    if (html.includes(secret)) throw new Error("a secret is on the page");
  }
  console.log(`ok: ${step} steps`);
} catch (error) {
  await shot("failed").catch(() => {});
  console.error(`step ${step + 1} failed: ${error.stack || error}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

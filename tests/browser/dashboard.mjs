// Drives the weirmq dashboard of a running order service in headless
// Chromium (run by tests/dashboard_browser.rs, which starts the service and
// checks afterwards that the resent dead letter was delivered).
//
// env: BASE (http://127.0.0.1:<port>), TOKEN, LAG_GROUP, LAG (the lag the
// overview must show for LAG_GROUP), DLQ_GROUP, SHOTS (screenshot dir),
// CHROMIUM (default /usr/bin/chromium).
// Prints one JSON line: {"resent": "<message id>"}.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const env = name => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("BASE"), token = env("TOKEN"), shots = env("SHOTS");
const lagGroup = env("LAG_GROUP"), lag = env("LAG"), dlqGroup = env("DLQ_GROUP");
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const failures = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("pageerror", e => failures.push(`page error: ${e.message}`));
  // The resend without the token is refused on purpose (401); any other
  // error on the console is a failure.
  page.on("console", m => {
    if (m.type() === "error" && !/status of 401/.test(m.text())) failures.push(`console: ${m.text()}`);
  });
  page.setDefaultTimeout(20000);

  // Overview: the stopped group's lag, in its row.
  await page.goto(`${base}/admin/`);
  const lagCell = page.locator(`#groups tr[data-group="${lagGroup}"] td.lag`);
  await lagCell.waitFor();
  await page.waitForFunction(
    ([g, want]) => document.querySelector(`#groups tr[data-group="${g}"] td.lag`)?.textContent.trim() === want,
    [lagGroup, Number(lag).toLocaleString("en-US")],
  );
  const deadCell = page.locator(`#groups tr[data-group="${dlqGroup}"] td.dead a`);
  await deadCell.waitFor();
  // A second refresh draws the lag sparkline with two points.
  await page.waitForSelector(`#groups tr[data-group="${lagGroup}"] svg.spark polyline`, { state: "attached" });
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  // Group page.
  await page.click(`#groups tr[data-group="${lagGroup}"] td a`);
  await page.waitForSelector("#queues");
  await page.waitForFunction(want => document.getElementById("group-lag")?.textContent.trim() === want,
    Number(lag).toLocaleString("en-US"));
  await page.screenshot({ path: `${shots}/group.png`, fullPage: true });

  // DLQ page: without the token, a resend is refused and says why.
  await page.goto(`${base}/admin/#/dlq/${encodeURIComponent(dlqGroup)}`);
  await page.waitForSelector("#dead-letters input.pick");
  const id = await page.locator("#dead-letters input.pick").first().getAttribute("value");
  await page.locator("#dead-letters input.pick").first().check();
  await page.click("#resend-selected");
  await page.waitForSelector("#status .err");
  const refused = await page.textContent("#status .err");
  if (!/token/i.test(refused)) failures.push(`a resend without the token should ask for it, said: ${refused}`);

  // With the token: resent, a result per message.
  await page.fill("#token", token);
  await page.click("#token-save");
  await page.waitForFunction(() => sessionStorage.getItem("weirmq-token"));
  // A fresh page (the token stays in the tab's sessionStorage).
  await page.reload();
  await page.waitForSelector("#dead-letters input.pick");
  await page.locator(`#dead-letters input.pick[value="${id}"]`).check();
  await page.click("#resend-selected");
  await page.waitForSelector("#resend-results .outcome");
  const outcome = (await page.textContent("#resend-results .outcome")).trim();
  if (outcome !== "resent") failures.push(`resend outcome: ${outcome}`);
  await page.screenshot({ path: `${shots}/dlq.png`, fullPage: true });

  // Message page with its trace timeline.
  await page.goto(`${base}/admin/#/message/${id}`);
  await page.waitForSelector("#timeline li");
  await page.waitForFunction(() => [...document.querySelectorAll("#timeline li b")]
    .some(b => b.textContent === "resent"));
  await page.screenshot({ path: `${shots}/message.png`, fullPage: true });

  // Search by key.
  await page.goto(`${base}/admin/#/messages`);
  await page.screenshot({ path: `${shots}/messages.png`, fullPage: true });

  // Readable at 1280×800: nothing wider than the window.
  await page.goto(`${base}/admin/`);
  await page.waitForSelector("#groups");
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  if (width > 1280) failures.push(`the overview is ${width}px wide at 1280×800`);
  console.log(JSON.stringify({ resent: id }));
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}

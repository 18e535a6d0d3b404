// The dashboard in a real headless Chromium: node dashboard.mjs URL OUTDIR
// The host at URL has a projection "counter" (test.>) and a projection "probe" holding a
// dead letter. Checks that every page loads without console errors, that a plugin's lag
// on the page drops to 0 after events are appended, that a dead letter's retry and delete
// clicked on the page take effect in the host, and that the live tail shows a new event.
// Saves a screenshot of each page in OUTDIR. Exits non-zero, saying why, on any failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [url, out] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const problems = [];
const api = async (path, opts) => {
  const r = await fetch(url + path, opts);
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
};
const append = (stream, events) =>
  api(`/v1/streams/${stream}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ events }),
  });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  page.on("console", (m) => { if (m.type() === "error") problems.push("console error: " + m.text()); });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.setDefaultTimeout(20000);

  // Overview: the counter's lag drops to 0 on the page after events are appended.
  await page.goto(url + "/");
  await page.waitForSelector('tr[data-plugin="counter"]');
  const events = Array.from({ length: 500 }, (_, i) => ({ type: "test.a", payload: { i } }));
  const appended = await append("browser", events);
  if (appended.status !== 200) throw new Error("append failed: " + JSON.stringify(appended.body));
  const want = String(500);
  await page.waitForFunction((want) => {
    const row = document.querySelector('tr[data-plugin="counter"]');
    return row && row.querySelector('[data-field="lag"]').textContent === "0" &&
      row.querySelector('[data-field="events"]').textContent.replace(/,/g, "") === want;
  }, want);
  await page.waitForFunction(() => document.querySelector("#chart polyline"));
  await page.screenshot({ path: `${out}/overview.png`, fullPage: true });

  // A plugin's page: a dead letter's retry and delete take effect in the host.
  await page.goto(url + "/#/plugin/probe");
  await page.waitForSelector("tr[data-dead-letter]");
  const id = await page.getAttribute("tr[data-dead-letter]", "data-dead-letter");
  const before = (await api(`/v1/dlq?plugin=probe`)).body.dead_letters[0].attempts;
  await page.click(`button[data-retry="${id}"]`);
  await page.waitForFunction(([id, before]) => {
    const cell = document.querySelector(`tr[data-dead-letter="${id}"] [data-field="attempts"]`);
    return cell && Number(cell.textContent) > before;
  }, [id, before]);
  const after = (await api(`/v1/dlq?plugin=probe`)).body.dead_letters[0].attempts;
  if (!(after > before)) problems.push(`the retry clicked did not reach the host: attempts ${before} -> ${after}`);
  await page.screenshot({ path: `${out}/plugin.png`, fullPage: true });
  await page.click(`button[data-delete="${id}"]`);
  await page.waitForFunction(() => !document.querySelector("tr[data-dead-letter]"));
  const left = (await api(`/v1/dlq?plugin=probe`)).body.dead_letters.length;
  if (left !== 0) problems.push(`the delete clicked did not reach the host: ${left} dead letters left`);

  // The state browser, now and at a past position.
  await page.goto(url + "/#/state");
  await page.waitForSelector("#s-name option", { state: "attached" });
  await page.selectOption("#s-name", "counter");
  await page.fill("#s-key", "test.a");
  await page.click('#state-form button[type="submit"]');
  await page.waitForFunction(() => document.getElementById("s-out").textContent.includes('"value": 500'));
  await page.screenshot({ path: `${out}/state.png`, fullPage: true });

  // The live tail shows a new event.
  await page.goto(url + "/#/tail");
  await page.fill("#t-pattern", "tail.>");
  await page.click('#tail-form button[type="submit"]');
  await page.waitForFunction(() => document.getElementById("t-status").textContent.startsWith("following"));
  await append("tail", [{ type: "tail.hello", payload: { from: "the browser test" } }]);
  await page.waitForSelector('tr[data-event-type="tail.hello"]');
  await page.screenshot({ path: `${out}/tail.png`, fullPage: true });

  // Schemas and alerts, and a flow page.
  await page.goto(url + "/#/schemas");
  await page.waitForSelector("#s-list p, #s-list table");
  await page.goto(url + "/#/flow");
  await page.waitForSelector("#flow-form");
} catch (e) {
  problems.push(String(e && e.stack || e));
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
console.log("dashboard: all checks passed; screenshots in " + out);

// Times `ferroscope view` in Debian's chromium for `cargo xtask bench`: from starting the
// viewer (the browser already running) until the page shows the day, a reload, then the
// requests a person makes next, as the page makes them. Prints one JSON object of
// milliseconds, and the viewer's peak RSS.
//
//   node open_time.mjs FERROSCOPE_BIN PROFILES_DIR ADDRESS APPLICATION
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const [bin, dir, address, application] = process.argv.slice(2);
const url = `http://${address}/#app=${encodeURIComponent(application)}`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const times = {};
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const started = Date.now();
const viewer = spawn(bin, ['view', dir, '--address', address], { stdio: ['ignore', 'pipe', 'inherit'] });
try {
  // Serving once it prints its address; reading the files meanwhile.
  for await (const line of createInterface({ input: viewer.stdout })) {
    if (line.startsWith('ferroscope: viewer on')) break;
  }
  const open = async () => {
    await page.goto(url);
    await page.waitForFunction(() => document.body.dataset.loaded, null, { timeout: 60000 });
  };
  await open();
  times.first_open_ms = Date.now() - started;
  await page.waitForFunction(() => document.body.dataset.complete === 'true', null, { timeout: 60000 });
  times.complete_ms = Date.now() - started;
  times.status = await page.locator('#status').innerText();
  const reopened = Date.now();
  await open();
  times.reopen_ms = Date.now() - reopened;
  // What the page asks next, timed in the page: an hour, a diff of two halves, a search.
  Object.assign(times, await page.evaluate(async () => {
    const app = new URLSearchParams(location.hash.slice(1)).get('app');
    const timed = async (path) => {
      const started = performance.now();
      const reply = await (await fetch(path)).json();
      return [Math.round(performance.now() - started), reply];
    };
    const [timelineMs, timeline] = await timed(`/api/timeline?app=${app}&type=cpu`);
    const first = timeline.periods[0][0];
    const last = timeline.periods[timeline.periods.length - 1][0];
    const middle = Math.round((first + last) / 2);
    const [hourMs] = await timed(`/api/profile?app=${app}&type=cpu&from=${middle}&to=${middle + 3600000}`);
    const [wallMs] = await timed(`/api/profile?app=${app}&type=wall`);
    const [diffMs, diff] = await timed(
      `/api/diff?app=${app}&type=cpu&from=${middle}&to=${last + 1}&base_from=${first}&base_to=${middle}`);
    return { timeline_ms: timelineMs, hour_ms: hourMs, day_wall_ms: wallMs, diff_ms: diffMs,
      diff_boxes: diff.nodes.length / 6, periods: timeline.periods.length };
  }));
  const typed = Date.now();
  await page.fill('#search', 'json');
  await page.waitForFunction(() => document.querySelector('#matched').textContent.startsWith('Matched'));
  times.search_ms = Date.now() - typed;
  // A profile as large as the viewer draws: opened, then redrawn.
  await page.goto('about:blank');
  const wide = Date.now();
  await page.goto(`http://${address}/#app=wide`);
  await page.waitForFunction(() => document.body.dataset.loaded, null, { timeout: 60000 });
  times.wide_open_ms = Date.now() - wide;
  times.wide_boxes = Number((await page.locator('#status').innerText()).match(/([\d,]+) boxes/)[1].replace(/,/g, ''));
  times.wide_redraw_ms = Math.round(await page.evaluate(() => {
    const started = performance.now();
    window.dispatchEvent(new Event('resize'));
    return performance.now() - started;
  }));
  const status = readFileSync(`/proc/${viewer.pid}/status`, 'utf8');
  times.peak_rss_kib = Number(status.match(/VmHWM:\s+(\d+)/)[1]);
} finally {
  viewer.kill();
  await browser.close();
}
console.log(JSON.stringify(times));

// Times `ferroscope view` in Debian's chromium for `cargo xtask bench`: the first open of
// the page (the viewer just started), a reload, then the requests a person makes next, as
// the page makes them. Prints one JSON object of milliseconds.
//
//   node open_time.mjs URL
import { chromium } from 'playwright-core';

const [url] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const times = {};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const open = async () => {
    const started = Date.now();
    await page.goto(url);
    await page.waitForFunction(() => document.body.dataset.loaded, null, { timeout: 60000 });
    return Date.now() - started;
  };
  times.first_open_ms = await open();
  times.status = await page.locator('#status').innerText();
  times.reopen_ms = await open();
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
  const started = Date.now();
  await page.fill('#search', 'json');
  await page.waitForFunction(() => document.querySelector('#matched').textContent.startsWith('Matched'));
  times.search_ms = Date.now() - started;
} finally {
  await browser.close();
}
console.log(JSON.stringify(times));

// Drives `ferroscope view` in Debian's chromium as a person would, and prints
// what the page showed as one JSON object; tests/tests/viewer.rs judges it.
//
//   node viewer.mjs URL FIRST_FROM_MS FIRST_TO_MS SECOND_FROM_MS SECOND_TO_MS PID_OF_SECOND SCREENSHOT_DIR
//
// The first range is the baseline of the diff, the second the range.
import { chromium } from 'playwright-core';

const [url, ...rest] = process.argv.slice(2);
const [firstFrom, firstTo, secondFrom, secondTo] = rest.slice(0, 4).map(Number);
const [secondPid, screenshots] = rest.slice(4);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // As root, and on a machine without a network: no sandbox, nothing in the background.
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const seen = { errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on('pageerror', (error) => seen.errors.push(`page error: ${error.message}`));
  page.on('console', (message) => { if (message.type() === 'error') seen.errors.push(message.text()); });
  page.on('requestfailed', (request) => seen.errors.push(`request failed: ${request.url()}`));

  // Every action that loads a profile bumps body[data-loaded].
  let loads = 0;
  const loaded = async () => {
    loads += 1;
    await page.waitForFunction((n) => Number(document.body.dataset.loaded || 0) >= n, loads, { timeout: 20000 });
  };
  const text = (selector) => page.locator(selector).innerText();

  const opened = Date.now();
  await page.goto(url);
  await loaded();
  // Every file read, so that no later load is the page's own.
  await page.waitForFunction(() => document.body.dataset.complete === 'true', null, { timeout: 20000 });
  seen.open_ms = Date.now() - opened;
  seen.application = await page.locator('#application').inputValue();
  seen.sample_types = await page.locator('#sample-type option').allInnerTexts();

  // Drags on the timeline over [from, to], at the x of those times.
  const drag = async (from, to) => {
    const box = await page.locator('#timeline').boundingBox();
    const x = (ms) => page.evaluate((t) => window.ferroscope.timelineX(t), ms);
    const y = box.y + box.height / 2;
    await page.mouse.move(box.x + (await x(from)), y);
    await page.mouse.down();
    await page.mouse.move(box.x + (await x(to)), y, { steps: 5 });
    await page.mouse.up();
    await loaded();
  };
  // The tooltip of the widest box of `name`, hovered.
  const hover = async (name) => {
    const box = await page.evaluate((n) => window.ferroscope.box(n), name);
    if (!box) return null;
    await page.mouse.move(box.x, box.y);
    await page.locator('#tooltip').waitFor({ state: 'visible' });
    return text('#tooltip');
  };

  // The range: the second run.
  await drag(secondFrom, secondTo);
  seen.range = await text('#range');
  seen.cpu_status = await text('#status');
  seen.cpu_crunch_c = await hover('Cruncher.crunch_c');
  seen.cpu_crunch_a = await hover('Cruncher.crunch_a');
  await page.screenshot({ path: `${screenshots}/viewer-flame.png` });

  // Zoom into crunch_c (a click), then back.
  const before = await page.evaluate(() => window.ferroscope.box('Cruncher.crunch_c').width);
  await page.mouse.click((await page.evaluate(() => window.ferroscope.box('Cruncher.crunch_c'))).x,
    (await page.evaluate(() => window.ferroscope.box('Cruncher.crunch_c'))).y);
  seen.zoomed_width = await page.evaluate(() => window.ferroscope.box('Cruncher.crunch_c').width);
  seen.unzoomed_width = before;
  await page.click('#reset-zoom');

  // Search.
  await page.fill('#search', 'crunch_b');
  await page.waitForFunction(() => document.querySelector('#matched').textContent.startsWith('Matched'));
  seen.search = await text('#matched');
  await page.fill('#search', '');
  await page.waitForFunction(() => document.querySelector('#matched').textContent === '');

  // Top table, by function then by line.
  await page.click('#tabs button[data-view="top"]');
  const rows = async () => page.locator('#top tbody tr').evaluateAll((trs) =>
    trs.slice(0, 40).map((tr) => [...tr.children].map((td) => td.textContent)));
  await page.click('#top th[data-sort="total"]');
  seen.top_by_total = await rows();
  await page.check('input[name="top-by"][value="line"]');
  seen.top_lines = await rows();
  await page.screenshot({ path: `${screenshots}/viewer-top.png` });

  // Icicle, then another sample type: wall time.
  await page.click('#tabs button[data-view="icicle"]');
  await page.selectOption('#sample-type', 'wall');
  await loaded();
  seen.wall_status = await text('#status');
  seen.wall_crunch_c = await hover('Cruncher.crunch_c');

  // The diff: the first run as the baseline.
  await page.selectOption('#sample-type', 'cpu');
  await loaded();
  await page.click('#compare');
  await drag(firstFrom, firstTo);
  seen.baseline = await text('#baseline');
  seen.diff_active = await page.locator('#tabs button[data-view="diff"]').getAttribute('class');
  seen.diff_crunch_c = await hover('Cruncher.crunch_c');
  seen.diff_crunch_a = await hover('Cruncher.crunch_a');
  seen.diff_colors = await page.evaluate(() => ({
    crunch_c: window.ferroscope.color('Cruncher.crunch_c'),
    crunch_a: window.ferroscope.color('Cruncher.crunch_a'),
  }));
  await page.screenshot({ path: `${screenshots}/viewer-diff.png` });

  // A label filter: the second run's process alone, over every period.
  await page.click('#tabs button[data-view="flame"]');
  await loaded();
  await page.click('#select-all');
  await loaded();
  await page.selectOption('#filter-key', 'pid');
  await page.selectOption('#filter-value', secondPid);
  await page.click('#filter-add');
  await loaded();
  seen.filters = await text('#filters');
  seen.filtered_crunch_c = await hover('Cruncher.crunch_c');
  seen.filtered_timeline = await page.evaluate(() => window.ferroscope.timelineValues());
} catch (error) {
  seen.errors.push(`${error.stack || error}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));

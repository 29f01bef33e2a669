// Ferroscope's viewer: a timeline of periods, and for the selected range a
// flame graph (or icicle), a top table and a diff against a baseline range.
// Plain JavaScript on canvas, served by the agent's binary: nothing to fetch.
'use strict';

const $ = (selector) => document.querySelector(selector);

const TYPE_NAMES = {
  cpu: 'CPU time', wall: 'Wall time', off_cpu: 'Off-CPU time', samples: 'Samples',
  alloc_objects: 'Allocations', alloc_space: 'Allocated memory',
  inuse_objects: 'Heap live objects', inuse_space: 'Heap live size',
};
const ROW = 18; // Height of a flame graph box, in CSS pixels.

// What is shown, kept in the URL's hash so that a view can be shared or reloaded.
const state = {
  app: null, type: 'cpu', filters: [], view: 'flame',
  range: null, baseline: null, // [from_ms, to_ms] or null for all
  search: '',
};
let timeline = null; // The reply of /api/timeline.
let flame = null; // The laid-out flame graph shown.
let comparing = false; // The next drag on the timeline sets the baseline.
let loadId = 0; // Replies to old requests are dropped.
let readingPoll = null; // Looks again while the viewer reads files.

// ---- Data ----

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (Array.isArray(value)) value.forEach((v) => query.append(key, v));
    else if (value !== null && value !== undefined) query.append(key, value);
  }
  const response = await fetch(`/api/${path}?${query}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

const filterParams = () => state.filters.map(([key, value]) => `${key}=${value}`);

function rangeParams(range, prefix = '') {
  return range ? { [`${prefix}from`]: range[0], [`${prefix}to`]: range[1] } : {};
}

function formatValue(value, unit) {
  if (unit === 'nanoseconds') {
    const seconds = value / 1e9;
    if (seconds >= 60) return `${(seconds / 60).toFixed(1)} min`;
    if (seconds >= 1) return `${seconds.toFixed(2)} s`;
    return `${(seconds * 1000).toFixed(1)} ms`;
  }
  if (unit === 'bytes') {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (Math.abs(value) >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  return Math.round(value).toLocaleString('en-US');
}

const percent = (part, whole) => (whole ? (100 * part) / whole : 0);
const formatPercent = (share) => `${share.toFixed(share < 10 ? 2 : 1)}%`;

function formatTime(ms, withDate) {
  const date = new Date(ms);
  const pad = (n) => String(n).padStart(2, '0');
  const time = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  return withDate ? `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${time}` : time;
}

// ---- URL hash ----

function saveHash() {
  const params = new URLSearchParams();
  params.set('app', state.app || '');
  params.set('type', state.type);
  params.set('view', state.view);
  if (state.range) params.set('range', state.range.join('-'));
  if (state.baseline) params.set('baseline', state.baseline.join('-'));
  state.filters.forEach(([key, value]) => params.append('filter', `${key}=${value}`));
  if (state.search) params.set('search', state.search);
  history.replaceState(null, '', `#${params}`);
}

function loadHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const range = (text) => {
    const parts = (text || '').split('-').map(Number);
    return parts.length === 2 && parts.every(Number.isFinite) ? parts : null;
  };
  state.app = params.get('app') || null;
  state.type = params.get('type') || 'cpu';
  state.view = params.get('view') || 'flame';
  state.range = range(params.get('range'));
  state.baseline = range(params.get('baseline'));
  state.filters = params.getAll('filter').map((f) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]);
  state.search = params.get('search') || '';
}

// ---- Timeline ----

function periodsIn(range) {
  if (!timeline) return [];
  return timeline.periods.filter(([start]) => !range || (start >= range[0] && start < range[1]));
}

function timelineExtent() {
  const periods = timeline.periods;
  if (!periods.length) return [0, 1];
  return [periods[0][0], Math.max(...periods.slice(-64).map((p) => p[1]))];
}

// The x of time `ms` on the timeline, from its left edge.
function timelineX(ms) {
  const [first, last] = timelineExtent();
  return ((ms - first) / Math.max(1, last - first)) * $('#timeline').clientWidth;
}

function drawTimeline() {
  const canvas = $('#timeline');
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const context = canvas.getContext('2d');
  context.scale(ratio, ratio);
  context.clearRect(0, 0, width, height);
  if (!timeline || !timeline.periods.length) {
    context.fillStyle = '#666';
    context.fillText('No profiles for this application yet.', 12, 40);
    return;
  }
  const [first, last] = timelineExtent();
  const axis = 16;
  const plot = height - axis;
  const x = timelineX;
  const max = Math.max(1, ...timeline.periods.map((p) => p[2]));
  for (const [range, color] of [[state.baseline, 'rgba(122,122,122,.25)'], [state.range, 'rgba(47,111,223,.18)']]) {
    if (!range) continue;
    context.fillStyle = color;
    context.fillRect(x(range[0]), 0, Math.max(2, x(range[1]) - x(range[0])), plot);
  }
  context.fillStyle = '#4a78c2';
  for (const [start, end, value] of timeline.periods) {
    const h = (value / max) * (plot - 4);
    context.fillRect(x(start), plot - h, Math.max(1, x(end) - x(start) - 0.5), h);
  }
  context.fillStyle = '#555';
  context.font = '11px system-ui, sans-serif';
  const withDate = last - first > 20 * 3600 * 1000;
  const ticks = Math.max(2, Math.floor(width / 160));
  for (let i = 0; i <= ticks; i += 1) {
    const ms = first + ((last - first) * i) / ticks;
    const label = formatTime(ms, withDate);
    const textWidth = context.measureText(label).width;
    context.fillText(label, Math.min(width - textWidth, Math.max(0, x(ms) - textWidth / 2)), height - 3);
  }
  const unit = timeline.sample_types.find((t) => t.type === state.type)?.unit;
  context.fillText(`max ${formatValue(max, unit)} per period`, 4, 11);
}

function describeRange(range) {
  const periods = periodsIn(range);
  if (!periods.length) return 'no periods';
  const withDate = periods[periods.length - 1][1] - periods[0][0] > 20 * 3600 * 1000;
  return `${formatTime(periods[0][0], withDate)} – ${formatTime(periods[periods.length - 1][1], withDate)}` +
    ` (${periods.length} period${periods.length === 1 ? '' : 's'})`;
}

function showRanges() {
  $('#range').textContent = `Range: ${state.range ? describeRange(state.range) : `all, ${describeRange(null)}`}`;
  $('#baseline').textContent = state.baseline ? `Baseline: ${describeRange(state.baseline)}` : '';
  $('#compare').textContent = comparing ? 'Drag the baseline range on the timeline…' : 'Compare with a baseline…';
  $('#tabs button[data-view="diff"]').disabled = !state.baseline;
}

function setupTimelineDrag() {
  const canvas = $('#timeline');
  let dragStart = null;
  const msAt = (event) => {
    const [first, last] = timelineExtent();
    const box = canvas.getBoundingClientRect();
    return first + ((event.clientX - box.left) / box.width) * (last - first);
  };
  canvas.addEventListener('mousedown', (event) => { dragStart = msAt(event); });
  window.addEventListener('mouseup', (event) => {
    if (dragStart === null || !timeline) return;
    const end = msAt(event);
    let range = [Math.min(dragStart, end), Math.max(dragStart, end)];
    dragStart = null;
    // A click selects the period under it; a drag, every period starting within it.
    const periods = timeline.periods.filter(([start, stop]) =>
      range[1] - range[0] < 1 ? start <= range[0] && range[0] < stop : stop > range[0] && start < range[1]);
    if (!periods.length) return;
    range = [periods[0][0], periods[periods.length - 1][0] + 1];
    if (comparing) {
      state.baseline = range;
      comparing = false;
      state.view = 'diff';
    } else {
      state.range = range;
    }
    refresh();
  });
}

// ---- Flame graph ----

// Lays out the reply of /api/profile or /api/diff: each box's depth,
// function, values, and its start and width in the [0, 1] of the root.
function layOut(reply) {
  const diff = reply.base_total !== null && reply.base_total !== undefined;
  const stride = diff ? 6 : 4;
  const n = reply.nodes.length / stride;
  const boxes = {
    n, diff, reply,
    depth: new Int32Array(n), fn: new Int32Array(n), parent: new Int32Array(n),
    total: new Float64Array(n), self: new Float64Array(n),
    baseTotal: new Float64Array(n), baseSelf: new Float64Array(n),
    x: new Float64Array(n), width: new Float64Array(n), maxDepth: 0,
  };
  const next = [0]; // Where the next box of each depth starts.
  const path = [];
  for (let i = 0; i < n; i += 1) {
    const at = i * stride;
    const depth = reply.nodes[at];
    boxes.depth[i] = depth;
    boxes.fn[i] = reply.nodes[at + 1];
    boxes.total[i] = reply.nodes[at + 2];
    boxes.self[i] = reply.nodes[at + 3];
    if (diff) {
      boxes.baseTotal[i] = reply.nodes[at + 4];
      boxes.baseSelf[i] = reply.nodes[at + 5];
    }
    const share = (value, whole) => (whole ? value / whole : 0);
    boxes.width[i] = diff
      ? (share(boxes.total[i], reply.total) + share(boxes.baseTotal[i], reply.base_total)) / 2
      : share(boxes.total[i], reply.total);
    if (i === 0) boxes.width[0] = 1;
    boxes.x[i] = next[depth] ?? 0;
    next[depth] = boxes.x[i] + boxes.width[i];
    next[depth + 1] = boxes.x[i];
    path[depth] = i;
    boxes.parent[i] = depth ? path[depth - 1] : -1;
    boxes.maxDepth = Math.max(boxes.maxDepth, depth);
  }
  boxes.focus = 0;
  boxes.matched = null;
  return boxes;
}

function hashHue(text) {
  let hash = 0;
  for (let i = 0; i < text.length; i += 1) hash = (hash * 31 + text.charCodeAt(i)) | 0;
  return Math.abs(hash);
}

function boxColor(boxes, i) {
  if (i === 0) return '#c9c9c9';
  const [name, , kind] = boxes.reply.functions[boxes.fn[i]];
  if (boxes.matched && boxes.matched[i]) return '#e040c8';
  if (boxes.diff) {
    const now = boxes.total[i] / (boxes.reply.total || 1);
    const before = boxes.baseTotal[i] / (boxes.reply.base_total || 1);
    const change = (now - before) / Math.max(now, before, 1e-12); // -1 .. 1
    const strength = Math.min(1, Math.abs(change) * 1.5);
    const light = 96 - 44 * strength;
    return change >= 0 ? `hsl(0, 80%, ${light}%)` : `hsl(215, 80%, ${light}%)`;
  }
  const h = hashHue(name);
  switch (kind) {
    case 'python': return `hsl(${28 + (h % 22)}, 90%, ${58 + (h % 14)}%)`;
    case 'native': return `hsl(${195 + (h % 25)}, 55%, ${64 + (h % 12)}%)`;
    case 'kernel': return `hsl(${95 + (h % 25)}, 45%, ${58 + (h % 12)}%)`;
    default: return '#b8b8b8';
  }
}

function boxName(boxes, i) {
  return i === 0 ? 'all' : boxes.reply.functions[boxes.fn[i]][0];
}

// The part of the root shown: the focused box's span.
function viewport(boxes) {
  return [boxes.x[boxes.focus], boxes.width[boxes.focus]];
}

function drawFlame() {
  const canvas = $('#flame');
  if (!flame) {
    canvas.height = 0;
    return;
  }
  const icicle = state.view === 'icicle';
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = (flame.maxDepth + 1) * ROW;
  canvas.style.height = `${height}px`;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const context = canvas.getContext('2d');
  context.scale(ratio, ratio);
  context.font = '12px system-ui, sans-serif';
  context.textBaseline = 'middle';
  const [x0, span] = viewport(flame);
  const focusDepth = flame.depth[flame.focus];
  const rects = new Array(flame.n); // Kept for hovering and clicking.
  for (let i = 0; i < flame.n; i += 1) {
    const depth = flame.depth[i];
    let left = ((flame.x[i] - x0) / span) * width;
    let right = ((flame.x[i] + flame.width[i] - x0) / span) * width;
    if (right <= 0 || left >= width || right - left < 0.3) continue;
    // The focused box's ancestors span the whole width, greyed.
    const ancestor = depth < focusDepth;
    left = Math.max(0, left);
    right = Math.min(width, right);
    const y = icicle ? depth * ROW : height - (depth + 1) * ROW;
    context.globalAlpha = ancestor ? 0.55 : 1;
    context.fillStyle = boxColor(flame, i);
    context.fillRect(left, y, Math.max(0.5, right - left - 0.5), ROW - 1);
    if (right - left > 28) {
      context.fillStyle = '#111';
      const name = boxName(flame, i);
      const room = Math.floor((right - left - 6) / 6.5);
      context.fillText(name.length > room ? `${name.slice(0, Math.max(0, room - 1))}…` : name, left + 3, y + ROW / 2);
    }
    rects[i] = [left, y, right];
  }
  context.globalAlpha = 1;
  flame.rects = rects;
  if (flame.scrolledFor !== state.view) {
    // The root in sight: at the bottom of a flame graph, the top of an icicle.
    $('#flame-box').scrollTop = icicle ? 0 : height;
    flame.scrolledFor = state.view;
  }
  $('#reset-zoom').hidden = flame.focus === 0;
}

function boxAt(event) {
  if (!flame || !flame.rects) return -1;
  const box = $('#flame').getBoundingClientRect();
  const px = event.clientX - box.left;
  const py = event.clientY - box.top;
  // The deepest box under the pointer is the one drawn there.
  for (let i = flame.n - 1; i >= 0; i -= 1) {
    const rect = flame.rects[i];
    if (rect && px >= rect[0] && px < rect[2] && py >= rect[1] && py < rect[1] + ROW) return i;
  }
  return -1;
}

function describeBox(i) {
  const reply = flame.reply;
  const unit = reply.unit;
  const [name, file, kind] = i === 0 ? ['all', '', ''] : reply.functions[flame.fn[i]];
  const lines = [name];
  if (file) lines.push(`${file} (${kind})`);
  const line = (label, value, whole) => `${label}: ${formatValue(value, unit)} (${formatPercent(percent(value, whole))})`;
  if (flame.diff) {
    lines.push(line('Range total', flame.total[i], reply.total));
    lines.push(line('Baseline total', flame.baseTotal[i], reply.base_total));
    const change = percent(flame.total[i], reply.total) - percent(flame.baseTotal[i], reply.base_total);
    lines.push(`Change: ${change >= 0 ? '+' : ''}${change.toFixed(2)} points of the total`);
  } else {
    lines.push(line('Total', flame.total[i], reply.total));
    lines.push(line('Self', flame.self[i], reply.total));
  }
  return lines.join('\n');
}

function setupFlameMouse() {
  const canvas = $('#flame');
  const tooltip = $('#tooltip');
  canvas.addEventListener('mousemove', (event) => {
    const i = boxAt(event);
    if (i < 0) {
      tooltip.hidden = true;
      return;
    }
    tooltip.textContent = describeBox(i);
    tooltip.hidden = false;
    const left = Math.min(event.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
    tooltip.style.left = `${left}px`;
    tooltip.style.top = `${event.clientY + 14}px`;
  });
  canvas.addEventListener('mouseleave', () => { tooltip.hidden = true; });
  canvas.addEventListener('click', (event) => {
    const i = boxAt(event);
    if (i < 0) return;
    flame.focus = i === flame.focus ? Math.max(0, flame.parent[i]) : i;
    drawFlame();
  });
  $('#reset-zoom').addEventListener('click', () => {
    flame.focus = 0;
    drawFlame();
  });
}

// ---- Search ----

function searchPattern() {
  if (!state.search) return null;
  try {
    return new RegExp(state.search, 'i');
  } catch {
    const escaped = state.search.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    return new RegExp(escaped, 'i');
  }
}

// Marks matching boxes and says what share of the total they hold (each
// sample once, even when a match calls another).
function applySearch() {
  const pattern = searchPattern();
  const matched = $('#matched');
  if (!flame || !pattern) {
    if (flame) flame.matched = null;
    matched.textContent = '';
    return;
  }
  flame.matched = new Uint8Array(flame.n);
  let total = 0;
  const counted = new Uint8Array(flame.n); // A box under a match counted already.
  for (let i = 1; i < flame.n; i += 1) {
    const parent = flame.parent[i];
    counted[i] = parent > 0 ? counted[parent] : 0;
    if (pattern.test(boxName(flame, i))) {
      flame.matched[i] = 1;
      if (!counted[i]) total += flame.total[i];
      counted[i] = 1;
    }
  }
  matched.textContent = `Matched: ${formatPercent(percent(total, flame.reply.total))} of the total`;
}

// ---- Top table ----

let topSort = 'self';

function drawTop() {
  if (!flame) return;
  const reply = flame.reply;
  const byLine = document.querySelector('input[name="top-by"]:checked').value === 'line';
  const pattern = searchPattern();
  let rows = byLine
    ? reply.top_lines.map(([fn, line, own, total]) => ({ fn, line, self: own, total }))
    : reply.top_functions.map(([fn, own, total]) => ({ fn, line: null, self: own, total }));
  rows = rows.map((row) => {
    const [name, file, kind] = reply.functions[row.fn];
    return { ...row, name, file: row.line ? `${file}:${row.line}` : file, kind };
  });
  if (pattern) rows = rows.filter((row) => pattern.test(row.name));
  const compare = {
    self: (a, b) => b.self - a.self || b.total - a.total,
    total: (a, b) => b.total - a.total || b.self - a.self,
    name: (a, b) => a.name.localeCompare(b.name),
    file: (a, b) => a.file.localeCompare(b.file),
  }[topSort];
  rows.sort(compare);
  const shown = rows.slice(0, 500);
  const cell = (text, className) => {
    const td = document.createElement('td');
    td.textContent = text;
    if (className) td.className = className;
    return td;
  };
  const body = document.createElement('tbody');
  for (const row of shown) {
    const tr = document.createElement('tr');
    tr.append(
      cell(formatValue(row.self, reply.unit), 'number'),
      cell(formatPercent(percent(row.self, reply.total)), 'number'),
      cell(formatValue(row.total, reply.unit), 'number'),
      cell(formatPercent(percent(row.total, reply.total)), 'number'),
      cell(row.name),
      cell(row.file, 'file'),
    );
    body.append(tr);
  }
  $('#top tbody').replaceWith(body);
  $('#top-count').textContent = `${shown.length} of ${rows.length} rows`;
  document.querySelectorAll('#top th').forEach((th) => th.classList.toggle('sorted', th.dataset.sort === topSort));
}

// ---- Views ----

function showView() {
  document.querySelectorAll('#tabs button[data-view]').forEach((button) =>
    button.classList.toggle('active', button.dataset.view === state.view));
  const top = state.view === 'top';
  $('#top-box').hidden = !top;
  $('#flame-box').hidden = top;
  $('#diff-help').hidden = state.view !== 'diff';
  if (top) drawTop();
  else drawFlame();
}

async function loadProfile() {
  const id = ++loadId;
  const diff = state.view === 'diff' && state.baseline;
  const params = { app: state.app, type: state.type, filter: filterParams(), ...rangeParams(state.range) };
  if (diff) Object.assign(params, rangeParams(state.baseline, 'base_'));
  $('#status').textContent = 'Loading…';
  const started = performance.now();
  const reply = await api(diff ? 'diff' : 'profile', params);
  if (id !== loadId) return;
  flame = layOut(reply);
  applySearch();
  showView();
  const typeName = TYPE_NAMES[state.type] || state.type;
  $('#status').textContent = `${typeName}: ${formatValue(reply.total, reply.unit)} in ${reply.periods} periods` +
    ` · ${flame.n.toLocaleString('en-US')} boxes · ${Math.round(performance.now() - started)} ms`;
  clearTimeout(readingPoll);
  if (timeline.reading) {
    $('#status').textContent = `${readingNote()} ${$('#status').textContent}`;
    readingPoll = setTimeout(pollReading, 200);
  }
  document.body.dataset.complete = String(!timeline.reading);
  const unreadable = timeline.unreadable.length;
  if (unreadable) {
    $('#status').textContent += ` · ${unreadable} file${unreadable === 1 ? '' : 's'} not read (see the viewer's terminal)`;
  }
  document.body.dataset.loaded = String(id);
}

function readingNote() {
  const [done, total] = timeline.reading;
  return `Reading ${done.toLocaleString('en-US')} of ${total.toLocaleString('en-US')} files; so far:`;
}

// While the viewer reads files, the timeline grows; the rest is loaded again
// once every file is in (a flame graph per poll would slow the reading).
async function pollReading() {
  try {
    timeline = await api('timeline', { app: state.app, type: state.type, filter: filterParams() });
  } catch (error) {
    $('#status').textContent = `Error: ${error.message}`;
    return;
  }
  drawTimeline();
  showRanges();
  if (timeline.reading) {
    $('#status').textContent = $('#status').textContent.replace(/^Reading [^;]*; so far:/, readingNote());
    readingPoll = setTimeout(pollReading, 200);
  } else {
    await reloadAll();
  }
}

async function refresh() {
  saveHash();
  showRanges();
  drawTimeline();
  try {
    await loadProfile();
  } catch (error) {
    $('#status').textContent = `Error: ${error.message}`;
  }
}

async function loadTimeline() {
  timeline = await api('timeline', { app: state.app, type: state.type, filter: filterParams() });
  const types = timeline.sample_types.map((t) => t.type);
  if (!types.includes(state.type)) state.type = types.includes('cpu') ? 'cpu' : types[0];
  const select = $('#sample-type');
  select.replaceChildren(...types.map((type) => new Option(TYPE_NAMES[type] || type, type, false, type === state.type)));
  const keys = $('#filter-key');
  keys.replaceChildren(new Option('label…', ''), ...timeline.labels.map(([key]) => new Option(key, key)));
  $('#filter-value').disabled = true;
  $('#filter-add').disabled = true;
  showFilters();
}

function showFilters() {
  const chips = state.filters.map(([key, value], index) => {
    const chip = document.createElement('span');
    chip.className = 'chip';
    chip.textContent = `${key}=${value}`;
    const remove = document.createElement('button');
    remove.textContent = '×';
    remove.title = 'Remove this filter';
    remove.addEventListener('click', () => {
      state.filters.splice(index, 1);
      reloadAll();
    });
    chip.append(remove);
    return chip;
  });
  $('#filters').replaceChildren(...chips);
}

async function reloadAll() {
  try {
    await loadTimeline();
  } catch (error) {
    $('#status').textContent = `Error: ${error.message}`;
    return;
  }
  await refresh();
}

function setupControls() {
  $('#application').addEventListener('change', (event) => {
    Object.assign(state, { app: event.target.value, range: null, baseline: null, filters: [] });
    if (state.view === 'diff') state.view = 'flame';
    reloadAll();
  });
  $('#sample-type').addEventListener('change', (event) => {
    state.type = event.target.value;
    reloadAll();
  });
  $('#filter-key').addEventListener('change', (event) => {
    const values = (timeline.labels.find(([key]) => key === event.target.value) || [null, []])[1];
    const select = $('#filter-value');
    select.replaceChildren(...values.slice(0, 1000).map((value) => new Option(value, value)));
    select.disabled = !values.length;
    $('#filter-add').disabled = !values.length;
  });
  $('#filter-add').addEventListener('click', () => {
    state.filters.push([$('#filter-key').value, $('#filter-value').value]);
    reloadAll();
  });
  $('#compare').addEventListener('click', () => {
    comparing = !comparing;
    showRanges();
  });
  $('#select-all').addEventListener('click', () => {
    state.range = null;
    refresh();
  });
  document.querySelectorAll('#tabs button[data-view]').forEach((button) => {
    button.addEventListener('click', () => {
      const before = state.view;
      state.view = button.dataset.view;
      saveHash();
      // The diff has values of its own; other views share one reply.
      if ((before === 'diff') !== (state.view === 'diff')) refresh();
      else showView();
    });
  });
  let typing = null;
  $('#search').addEventListener('input', (event) => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      state.search = event.target.value;
      saveHash();
      applySearch();
      showView();
    }, 120);
  });
  document.querySelectorAll('input[name="top-by"]').forEach((input) => input.addEventListener('change', drawTop));
  document.querySelectorAll('#top th').forEach((th) => th.addEventListener('click', () => {
    topSort = th.dataset.sort;
    drawTop();
  }));
  window.addEventListener('resize', () => {
    drawTimeline();
    if (state.view !== 'top') drawFlame();
  });
}

async function start() {
  loadHash();
  $('#search').value = state.search;
  setupControls();
  setupTimelineDrag();
  setupFlameMouse();
  let applications;
  try {
    applications = await api('applications', {});
  } catch (error) {
    $('#status').textContent = `Error: ${error.message}`;
    return;
  }
  if (!applications.length) {
    $('#status').textContent = 'No profiles in this directory yet: run `ferroscope agent --output-dir DIR`.';
    return;
  }
  if (!applications.some((app) => app.name === state.app)) {
    // The application written last, as `ferroscope view` read it first.
    state.app = applications.reduce((a, b) => (b.last_change_ms > a.last_change_ms ? b : a)).name;
  }
  $('#application').replaceChildren(...applications.map((app) =>
    new Option(`${app.name} (${app.files})`, app.name, false, app.name === state.app)));
  await reloadAll();
}

// For the end-to-end test and the curious: where things are drawn.
window.ferroscope = {
  // The widest box of function `name`, scrolled into view: its centre in
  // the window, and its width.
  box(name) {
    const i = widestBox(name);
    if (i < 0) return null;
    const scroller = $('#flame-box');
    scroller.scrollTop = flame.rects[i][1] - scroller.clientHeight / 2;
    const canvas = $('#flame').getBoundingClientRect();
    const [left, y, right] = flame.rects[i];
    return { x: canvas.left + (left + right) / 2, y: canvas.top + y + ROW / 2, width: right - left };
  },
  color(name) {
    const i = widestBox(name);
    return i < 0 ? null : boxColor(flame, i);
  },
  timelineX,
  timelineValues: () => timeline.periods.map((period) => period[2]),
};

function widestBox(name) {
  if (!flame || !flame.rects) return -1;
  let best = -1;
  for (let i = 1; i < flame.n; i += 1) {
    if (flame.rects[i] && boxName(flame, i) === name && (best < 0 || flame.total[i] > flame.total[best])) best = i;
  }
  return best;
}

start();

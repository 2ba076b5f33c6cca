// herald console: signs in with an API key (kept in sessionStorage only) and calls herald's JSON
// API with it. Every value from the API is put in the page with textContent or as an attribute
// value, never parsed as markup, so a payload holding "<script>" shows as text.
'use strict';

const KEY_ITEM = 'herald.key';
const PAGE_SIZE = 50;
// API pages one page of failures may read (an event-type pattern is matched here, so a page
// may need several); past it the page shows what it found and "Older" goes on.
const FETCHES_PER_PAGE_MAX = 20;
const COUNT_PAGE = 250;
const COUNT_PAGES_MAX = 4;
const REFRESH_MS = 10000;
const FOLLOW_MS = 700;
const FOLLOW_MAX = 60;
const ENDPOINT_PAGES_MAX = 4;

const $ = (id) => document.getElementById(id);

// ---- DOM helpers: text only ----

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = value;
    else if (name.startsWith('data-')) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function show(node, visible) {
  node.hidden = !visible;
}

function when(ts) {
  if (!ts) return '—';
  return ts.replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function badge(status) {
  return el('span', { class: 'badge ' + status, text: status });
}

function fields(dl, pairs) {
  clear(dl);
  for (const [name, value] of pairs) {
    dl.append(el('dt', { text: name }), el('dd', {}, value === null || value === undefined ? '—' : value));
  }
}

// ---- the API ----

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = { authorization: 'Bearer ' + key };
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'herald did not answer (' + e.message + ')');
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const why = data && (data.error || data.name) ? data.error || data.name : response.statusText;
    throw new ApiError(response.status, response.status + ': ' + why);
  }
  return data;
}

// A call made by a view: a refused key signs out, anything else is shown in the notice.
async function call(method, path, body) {
  try {
    return await api(method, path, body);
  } catch (e) {
    if (e.status === 401) signOut('Your key was refused (401 Invalid API key). Sign in again.');
    else notice(e.message, 'error');
    throw e;
  }
}

function notice(text, kind) {
  const n = $('notice');
  n.textContent = text || '';
  n.className = 'notice ' + (kind || '');
  show(n, Boolean(text));
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
  return q.toString();
}

// ---- sign in ----

async function signIn(event) {
  event.preventDefault();
  const input = $('signin-key');
  const key = input.value.trim();
  const error = $('signin-error');
  show(error, false);
  sessionStorage.setItem(KEY_ITEM, key);
  try {
    await api('GET', '/v1/webhook_deliveries?limit=1');
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      sessionStorage.removeItem(KEY_ITEM);
      error.textContent = e.status === 401
        ? 'Wrong key: herald refused it (401 Invalid API key).'
        : 'This key may not read deliveries (403): the console needs deliveries.read.';
    } else {
      sessionStorage.removeItem(KEY_ITEM);
      error.textContent = 'Could not sign in: ' + e.message;
    }
    show(error, true);
    return;
  }
  input.value = '';
  if (!location.hash || location.hash === '#/signin') location.hash = '#/failures';
  route();
}

function signOut(why) {
  sessionStorage.removeItem(KEY_ITEM);
  endpoints.clear();
  notice(typeof why === 'string' ? why : '', 'error');
  route();
}

// ---- endpoints, by id (names for the lists, choices for the filters) ----

const endpoints = new Map();

async function loadEndpoints() {
  let cursor = null;
  for (let i = 0; i < ENDPOINT_PAGES_MAX; i++) {
    let page;
    try {
      page = await api('GET', '/v1/endpoints?' + query({ limit: 250, cursor }));
    } catch (e) {
      return; // a key without endpoints.read: ids are shown instead of names
    }
    for (const e of page.data) endpoints.set(e.id, e);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  for (const select of document.querySelectorAll('select.endpoint-choice')) {
    const chosen = select.value;
    clear(select);
    select.append(el('option', { value: '', text: 'any' }));
    for (const e of endpoints.values()) {
      select.append(el('option', { value: e.id, text: endpointLabel(e.id) }));
    }
    select.value = chosen;
  }
}

function endpointLabel(id) {
  if (!id) return '(inline webhook_url)';
  const e = endpoints.get(id);
  if (!e) return id;
  return (e.name || '(unnamed)') + ' — ' + e.url;
}

// The endpoint's name over its URL (its id while its name is unknown).
function endpointCell(id) {
  const e = id && endpoints.get(id);
  if (!e) return [endpointLabel(id)];
  return [el('span', { text: e.name || '(unnamed)' }), el('span', { class: 'endpoint-url', text: e.url })];
}

// ---- failures: two status lists merged newest first, paged with their cursors ----

let failures = { filter: null, streams: [], back: [], page: 1 };

function readFailureFilter() {
  const f = new FormData($('failures-filter'));
  const type = String(f.get('event_type') || '').trim();
  // A pattern as endpoints take them: `*` or a prefix ending in `.*`; matched here, since the
  // list's event_type filter takes an exact type only.
  if (type.includes('*') && type !== '*' && !(type.endsWith('.*') && type.indexOf('*') === type.length - 1)) {
    throw new ApiError(400, 'Event type: an exact type, *, or a prefix pattern ending in .* (call.*)');
  }
  const pattern = type.endsWith('*') ? type.slice(0, -1) : null;
  return {
    statuses: f.get('status') === 'both' ? ['exhausted', 'inactive'] : [String(f.get('status'))],
    endpoint: f.get('endpoint') || '',
    exactType: pattern === null ? type : '',
    prefix: pattern,
    after: utc(f.get('created_after')),
    before: utc(f.get('created_before')),
  };
}

function utc(local) {
  if (!local) return '';
  const d = new Date(String(local));
  return isNaN(d.getTime()) ? '' : d.toISOString();
}

// The API's list order: created_at, then id (lowercase hex, so text order is byte order).
function newer(a, b) {
  const at = Date.parse(a.created_at);
  const bt = Date.parse(b.created_at);
  if (at !== bt) return at > bt;
  return a.id > b.id;
}

async function fillStream(s, f) {
  const q = query({
    status: s.status, endpoint_id: f.endpoint, event_type: f.exactType,
    created_after: f.after, created_before: f.before, limit: PAGE_SIZE, cursor: s.cursor,
  });
  const page = await call('GET', '/v1/webhook_deliveries?' + q);
  const keep = page.data.filter((d) => f.prefix === null || d.event_type.startsWith(f.prefix));
  s.buf.push(...keep);
  s.cursor = page.next_cursor;
  s.done = !page.next_cursor;
}

async function takePage(streams, f) {
  const rows = [];
  let fetches = 0;
  while (rows.length < PAGE_SIZE) {
    for (const s of streams) {
      while (!s.buf.length && !s.done && fetches < FETCHES_PER_PAGE_MAX) {
        await fillStream(s, f);
        fetches++;
      }
    }
    // A list not yet read this far may hold a newer row: stop here rather than misorder.
    if (streams.some((s) => !s.buf.length && !s.done)) break;
    let best = null;
    for (const s of streams) if (s.buf.length && (!best || newer(s.buf[0], best.buf[0]))) best = s;
    if (!best) break;
    rows.push(best.buf.shift());
  }
  return rows;
}

const snapshot = (streams) => streams.map((s) => ({ ...s, buf: s.buf.slice() }));

async function showFailures(direction) {
  if (direction === 'first') {
    let f;
    try {
      f = readFailureFilter();
    } catch (e) {
      notice(e.message, 'error');
      throw e;
    }
    failures = { filter: f, back: [], page: 1,
      streams: f.statuses.map((status) => ({ status, cursor: null, buf: [], done: false })) };
  } else if (direction === 'older') {
    failures.back.push(failures.start);
    failures.streams = snapshot(failures.after);
    failures.page++;
  } else if (direction === 'newer' && failures.back.length) {
    failures.streams = snapshot(failures.back.pop());
    failures.page--;
  } else if (direction === 'refresh') {
    failures.streams = snapshot(failures.start);
  }
  failures.start = snapshot(failures.streams);
  const rows = await takePage(failures.streams, failures.filter);
  failures.after = snapshot(failures.streams);
  const more = failures.streams.some((s) => s.buf.length || !s.done);
  renderFailures(rows, more);
}

function renderFailures(rows, more) {
  const body = $('failures-table').tBodies[0];
  clear(body);
  for (const d of rows) {
    const link = el('a', { href: '#/delivery/' + d.id, text: d.event_type });
    body.append(el('tr', { 'data-id': d.id },
      el('td', {}, link),
      el('td', { class: 'wrap' }, ...endpointCell(d.endpoint_id)),
      el('td', {}, badge(d.status)),
      el('td', { class: 'wrap', text: reason(d) }),
      el('td', { class: 'num', text: attemptsText(d) }),
      el('td', { class: 'time', text: when(d.updated_at) })));
  }
  const empty = $('failures-empty');
  empty.textContent = more ? 'None in this stretch of the list; “Older” reads on.' : 'No failures match.';
  show(empty, rows.length === 0);
  $('failures-newer').disabled = failures.back.length === 0;
  $('failures-older').disabled = !more;
  $('failures-page').textContent = 'page ' + failures.page;
}

function reason(d) {
  const parts = [];
  if (d.last_error) parts.push(d.last_error);
  else if (d.last_response_status) parts.push('HTTP ' + d.last_response_status);
  if (d.status === 'inactive') {
    const e = endpoints.get(d.endpoint_id);
    if (e && e.inactive_reason) parts.push('endpoint: ' + e.inactive_reason);
    else if (!parts.length) parts.push('endpoint inactive');
  }
  return parts.join('; ') || '—';
}

function attemptsText(d) {
  return d.manual_retry_count ? d.attempt_count + ' (' + d.manual_retry_count + ' manual)' : String(d.attempt_count);
}

// ---- one delivery ----

let following = 0;

async function showDelivery(id) {
  const [d, attempts] = await Promise.all([
    call('GET', '/v1/webhook_deliveries/' + encodeURIComponent(id)),
    call('GET', '/v1/webhook_deliveries/' + encodeURIComponent(id) + '/attempts'),
  ]);
  $('delivery-id').textContent = d.id;
  fields($('delivery-fields'), [
    ['Status', badge(d.status)],
    ['Event type', d.event_type],
    ['Endpoint', endpointLabel(d.endpoint_id)],
    ['URL', d.url],
    ['Attempts', attemptsText(d)],
    ['Last error', d.last_error],
    ['Last response status', d.last_response_status],
    ['Last attempt', attempts.data.length ? when(attempts.data[attempts.data.length - 1].started_at) : null],
    ['Next attempt', d.next_attempt_at && when(d.next_attempt_at)],
    ['Delivered', d.delivered_at && when(d.delivered_at)],
    ['Created', when(d.created_at)],
    ['Updated', when(d.updated_at)],
    ['Event', d.event_id],
    ['Ordering key', d.ordering_key],
    ['Call id', d.call_id],
  ]);
  const failed = d.status === 'exhausted' || d.status === 'inactive';
  $('delivery-retrigger').disabled = !failed;
  $('delivery-redeliver').disabled = d.status === 'pending';
  renderAttempts(attempts.data);
  if ($('delivery-payload').dataset.event !== d.event_id) loadPayload(d.event_id);
  return d;
}

function renderAttempts(list) {
  const body = $('attempts-table').tBodies[0];
  clear(body);
  for (const a of list) {
    const ok = a.response_status !== null && a.response_status >= 200 && a.response_status < 300;
    body.append(el('tr', { class: ok ? 'ok' : 'failed' },
      el('td', { class: 'num', text: a.attempt }),
      el('td', { text: a.trigger }),
      el('td', { text: when(a.started_at) }),
      el('td', { class: 'num', text: a.duration_ms + ' ms' }),
      el('td', { class: 'num', text: a.response_status === null ? '—' : a.response_status }),
      el('td', { class: 'wrap', text: a.error || '' }),
      el('td', {}, a.response_excerpt ? el('pre', { class: 'excerpt', text: a.response_excerpt }) : '')));
  }
  show($('attempts-empty'), list.length === 0);
}

async function loadPayload(eventId) {
  const pre = $('delivery-payload');
  pre.dataset.event = eventId;
  pre.textContent = '…';
  try {
    const e = await api('GET', '/v1/events/' + encodeURIComponent(eventId));
    pre.textContent = JSON.stringify(e.payload, null, 2);
  } catch (err) {
    pre.textContent = 'The payload could not be read: ' + err.message;
  }
}

async function deliveryAction(kind) {
  const id = $('delivery-id').textContent;
  const message = $('delivery-message');
  const path = kind === 'retrigger'
    ? '/api/webhooks/v1/failures/' + encodeURIComponent(id) + '/retrigger'
    : '/v1/webhook_deliveries/' + encodeURIComponent(id) + '/redeliver';
  message.textContent = kind === 'retrigger' ? 'Retriggering…' : 'Redelivering…';
  try {
    await api('POST', path);
  } catch (e) {
    message.textContent = (kind === 'retrigger' ? 'Retrigger' : 'Redeliver') + ' refused: ' + e.message;
    return;
  }
  message.textContent = 'Queued: a new attempt is on its way.';
  followDelivery(id);
}

// Looks again shortly after an action until the delivery leaves pending (bounded).
async function followDelivery(id) {
  const mine = ++following;
  for (let i = 0; i < FOLLOW_MAX && mine === following && current.view === 'delivery'; i++) {
    await sleep(FOLLOW_MS);
    if (mine !== following || current.view !== 'delivery' || current.arg !== id) return;
    const d = await showDelivery(id).catch(() => null);
    if (d && d.status !== 'pending') {
      $('delivery-message').textContent = 'Now ' + d.status + '.';
      return;
    }
  }
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// ---- endpoints ----

let endpointPages = { cursors: [null], index: 0, next: null, open: null };

async function showEndpoints() {
  const cursor = endpointPages.cursors[endpointPages.index];
  const page = await call('GET', '/v1/endpoints?' + query({ limit: PAGE_SIZE, cursor }));
  endpointPages.next = page.next_cursor;
  const body = $('endpoints-table').tBodies[0];
  clear(body);
  for (const e of page.data) {
    endpoints.set(e.id, e);
    const status = el('div', {}, badge(e.status));
    if (e.inactive_reason) status.append(el('div', { class: 'why', text: e.inactive_reason }));
    if (e.failure_run) status.append(el('div', { class: 'why', text: failureRunText(e.failure_run) }));
    const enable = e.status === 'inactive'
      ? el('button', { type: 'button', class: 'enable', text: 'Enable', 'data-id': e.id })
      : null;
    const details = el('button', { type: 'button', class: 'quiet details', text: 'Details', 'data-id': e.id });
    body.append(el('tr', { 'data-id': e.id },
      el('td', { text: e.name || '(unnamed)' }),
      el('td', { class: 'wrap', text: e.url }),
      el('td', {}, status),
      el('td', { text: settingsText(e) }),
      el('td', { text: e.enabled_events.join(', ') }),
      el('td', { class: 'row-actions' }, details, enable)));
  }
  show($('endpoints-empty'), page.data.length === 0);
  $('endpoints-newer').disabled = endpointPages.index === 0;
  $('endpoints-older').disabled = !endpointPages.next;
  if (endpointPages.open) await showEndpointDetail(endpointPages.open);
}

// The failures since the endpoint's last success (counted up to the inactive rule's number).
function failureRunText(run) {
  const n = run.failures + (run.failures === 1 ? ' failure' : ' failures');
  return n + ' since the last success, ' + when(run.first_at) + ' to ' + when(run.last_at);
}

function settingsText(e) {
  return [
    'rate ' + (e.rate_limit_per_s === null ? 'unlimited' : e.rate_limit_per_s + '/s'),
    'in flight ' + (e.max_in_flight === null ? 'default' : '≤ ' + e.max_in_flight),
    'ordering ' + e.ordering,
  ].join(' · ');
}

async function showEndpointDetail(id) {
  endpointPages.open = id;
  const e = await call('GET', '/v1/endpoints/' + encodeURIComponent(id));
  endpoints.set(e.id, e);
  $('endpoint-detail-name').textContent = e.name || e.id;
  fields($('endpoint-detail-fields'), [
    ['Id', e.id],
    ['URL', e.url],
    ['Status', e.status],
    ['Why inactive', e.inactive_reason],
    ['Failure run', e.failure_run ? failureRunText(e.failure_run) : 'none (last attempt succeeded, or none yet)'],
    ['Rate limit', e.rate_limit_per_s === null ? 'none' : e.rate_limit_per_s + ' per second'],
    ['In flight at most', e.max_in_flight === null ? 'the configured default' : e.max_in_flight],
    ['Ordering', e.ordering],
    ['Extra headers', e.headers ? Object.keys(e.headers).join(', ') : 'none'],
    ['Events', e.enabled_events.join(', ')],
    ['Created', when(e.created_at)],
    ['Updated', when(e.updated_at)],
  ]);
  show($('endpoint-detail'), true);
  const counts = await Promise.all(['pending', 'delivered', 'exhausted', 'inactive'].map((s) => countOf(id, s)));
  const body = $('endpoint-counts').tBodies[0];
  clear(body);
  body.append(el('tr', {}, ...counts.map((c) => el('td', { class: 'num', text: c }))));
}

// Deliveries of an endpoint in a status, counted a page at a time up to a bound.
async function countOf(endpointId, status) {
  let n = 0;
  let cursor = null;
  for (let i = 0; i < COUNT_PAGES_MAX; i++) {
    const page = await api('GET', '/v1/webhook_deliveries?' + query({ endpoint_id: endpointId, status, limit: COUNT_PAGE, cursor }));
    n += page.data.length;
    cursor = page.next_cursor;
    if (!cursor) return String(n);
  }
  return n + '+';
}

async function enableEndpoint(id) {
  try {
    await call('POST', '/v1/endpoints/' + encodeURIComponent(id) + '/enable');
    notice('Endpoint enabled.', 'ok');
  } catch (e) {
    return;
  }
  await showEndpoints();
}

// ---- recover ----

let preview = null;

function readRecoverForm() {
  const form = $('recover-form');
  const f = new FormData(form);
  const body = { status: f.getAll('status').map(String), dry_run: true };
  const endpoint = f.get('endpoint');
  if (endpoint) body.endpoint_id = endpoint;
  const type = String(f.get('event_type') || '').trim();
  if (type) body.event_type = type;
  const after = utc(f.get('created_after'));
  if (after) body.created_after = after;
  const before = utc(f.get('created_before'));
  if (before) body.created_before = before;
  const max = String(f.get('max') || '').trim();
  if (max) body.max = Number(max);
  let org = String(f.get('org_id') || '').trim();
  if (!org && endpoint && endpoints.has(endpoint)) org = endpoints.get(endpoint).org_id;
  // An admin key must name the organisation: the one every endpoint it sees belongs to, if one.
  const orgs = new Set(Array.from(endpoints.values(), (e) => e.org_id));
  if (!org && orgs.size === 1) org = orgs.values().next().value;
  if (org) body.org_id = org;
  return body;
}

async function recoverPreview(event) {
  event.preventDefault();
  const error = $('recover-error');
  show(error, false);
  show($('recover-preview'), false);
  const body = readRecoverForm();
  let answer;
  try {
    answer = await api('POST', '/v1/webhook_deliveries/recover', body);
  } catch (e) {
    error.textContent = 'Preview refused: ' + e.message;
    show(error, true);
    return;
  }
  preview = body;
  $('recover-matched').textContent = answer.matched;
  $('recover-matched-text').textContent = answer.matched === 1
    ? 'delivery would be sent again.' : 'deliveries would be sent again.';
  const truncated = $('recover-truncated');
  truncated.textContent = 'More deliveries match than “At most”: only the oldest ' + answer.matched + ' would go.';
  show(truncated, answer.truncated);
  $('recover-sample-count').textContent = answer.sample.length;
  const list = $('recover-sample');
  clear(list);
  for (const id of answer.sample) list.append(el('li', {}, el('a', { href: '#/delivery/' + id, text: id })));
  const confirm = $('recover-confirm');
  confirm.disabled = answer.matched === 0;
  confirm.textContent = 'Recover ' + answer.matched + (answer.matched === 1 ? ' delivery' : ' deliveries');
  show($('recover-preview'), true);
}

async function recoverConfirm() {
  if (!preview) return;
  const error = $('recover-error');
  $('recover-confirm').disabled = true;
  let answer;
  try {
    answer = await api('POST', '/v1/webhook_deliveries/recover', { ...preview, dry_run: false });
  } catch (e) {
    error.textContent = 'Recover refused: ' + e.message;
    show(error, true);
    $('recover-confirm').disabled = false;
    return;
  }
  preview = null;
  show($('recover-preview'), false);
  location.hash = '#/recovery/' + answer.recovery_id;
}

async function showRecovery(id) {
  const r = await call('GET', '/v1/recoveries/' + encodeURIComponent(id));
  $('recovery-id').textContent = r.id;
  const settled = r.delivered + r.failed;
  const done = r.pending === 0;
  $('recovery-state').textContent = done
    ? 'Done: ' + r.delivered + ' delivered, ' + r.failed + ' failed again.'
    : 'In progress: ' + settled + ' of ' + r.queued + ' settled.';
  $('recovery-state').className = done ? 'done' : 'running';
  const bar = $('recovery-progress');
  bar.max = Math.max(r.queued, 1);
  bar.value = r.queued === 0 ? 1 : settled;
  const body = $('recovery-counts').tBodies[0];
  clear(body);
  body.append(el('tr', {}, ...[r.queued, r.delivered, r.pending, r.failed].map((n) => el('td', { class: 'num', text: n }))));
  const f = r.filter;
  fields($('recovery-fields'), [
    ['Statuses', f.status.join(', ')],
    ['Endpoint', f.endpoint_id ? endpointLabel(f.endpoint_id) : 'any'],
    ['Event type', f.event_type || 'any'],
    ['Created after', f.created_after && when(f.created_after)],
    ['Created before', f.created_before && when(f.created_before)],
    ['At most', f.max],
    ['Started', when(r.created_at)],
    ['By', r.actor.kind === 'key' ? 'API key ' + r.actor.key_id : 'herald'],
  ]);
  if (!done) schedule(1000);
}

// ---- views and the refresh poll ----

let current = { view: null, arg: null };
let timer = null;

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(refresh, ms);
}

async function refresh() {
  if (!sessionStorage.getItem(KEY_ITEM)) return;
  schedule(REFRESH_MS);
  if (document.hidden) return;
  try {
    await render(false);
  } catch (e) {
    // shown in the notice by call()
  }
}

async function render(first) {
  const { view, arg } = current;
  if (view === 'failures') {
    // Only the first page follows new failures; a later page stays as the operator left it.
    if (first) await showFailures('first');
    else if (failures.page === 1) await showFailures('refresh');
  } else if (view === 'delivery') await showDelivery(arg);
  else if (view === 'endpoints') await showEndpoints();
  else if (view === 'recovery') await showRecovery(arg);
  else if (view === 'recover' && first) await loadEndpoints();
}

function route() {
  const signedIn = Boolean(sessionStorage.getItem(KEY_ITEM));
  const [, view, arg] = (location.hash.match(/^#\/([a-z]+)(?:\/([0-9a-fA-F-]+))?$/) || []);
  const wanted = signedIn ? (view && $('view-' + view) && view !== 'signin' ? view : 'failures') : 'signin';
  current = { view: wanted, arg: arg || null };
  following++;
  for (const section of document.querySelectorAll('section.view')) show(section, section.id === 'view-' + wanted);
  show($('nav'), signedIn);
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('current', a.dataset.view === wanted);
  if (!signedIn) {
    clearTimeout(timer);
    $('signin-key').focus();
    return;
  }
  if (wanted !== 'delivery') $('delivery-message').textContent = '';
  schedule(REFRESH_MS);
  const ready = endpoints.size ? Promise.resolve() : loadEndpoints();
  ready.then(() => render(true)).catch(() => {});
}

function onEndpointsClick(event) {
  const button = event.target.closest('button[data-id]');
  if (!button) return;
  if (button.classList.contains('enable')) enableEndpoint(button.dataset.id);
  else showEndpointDetail(button.dataset.id).then(() => $('endpoint-detail').scrollIntoView()).catch(() => {});
}

function pageEndpoints(step) {
  if (step > 0 && endpointPages.next) {
    endpointPages.cursors[endpointPages.index + 1] = endpointPages.next;
    endpointPages.index++;
  } else if (step < 0 && endpointPages.index > 0) {
    endpointPages.index--;
  }
  showEndpoints().catch(() => {});
}

function start() {
  $('count-cap').textContent = COUNT_PAGE * COUNT_PAGES_MAX;
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', () => signOut(''));
  $('failures-filter').addEventListener('submit', (e) => {
    e.preventDefault();
    showFailures('first').catch(() => {});
  });
  $('failures-older').addEventListener('click', () => showFailures('older').catch(() => {}));
  $('failures-newer').addEventListener('click', () => showFailures('newer').catch(() => {}));
  $('delivery-retrigger').addEventListener('click', () => deliveryAction('retrigger'));
  $('delivery-redeliver').addEventListener('click', () => deliveryAction('redeliver'));
  $('endpoints-table').addEventListener('click', onEndpointsClick);
  $('endpoints-older').addEventListener('click', () => pageEndpoints(1));
  $('endpoints-newer').addEventListener('click', () => pageEndpoints(-1));
  $('recover-form').addEventListener('submit', recoverPreview);
  $('recover-confirm').addEventListener('click', recoverConfirm);
  $('recover-cancel').addEventListener('click', () => show($('recover-preview'), false));
  window.addEventListener('hashchange', () => {
    notice('');
    route();
  });
  route();
}

document.addEventListener('DOMContentLoaded', start);

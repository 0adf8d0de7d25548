// Browser tests of the aether web UI, driven by Playwright against a running `aether ui`.
//
//   node ui/tests/run.mjs driver|e2e
//
// Environment: AETHER_UI_URL (the URL `aether ui` printed, token included, not yet used),
// AETHER_UI_OUT (a directory for screenshots), AETHER_UI_PROJECT (an existing, empty project:
// driver), AETHER_UI_WORKSPACE (a stopped workspace of a real guest: e2e), AETHER_CHROMIUM
// (default /usr/bin/chromium). One line per step; exits 0 only when every assertion held, else
// prints what was expected and what was seen and saves failure.png. See README.md.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { inspect } from 'node:util';
import { chromium } from 'playwright-core';

const scenario = process.argv[2];
const SCENARIOS = { driver, e2e };
if (!SCENARIOS[scenario]) {
  console.error(`usage: node run.mjs ${Object.keys(SCENARIOS).join('|')}`);
  process.exit(2);
}
function env(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`run.mjs: ${name} must be set (see ui/tests/README.md)`);
    process.exit(2);
  }
  return v;
}
const tokenUrl = new URL(env('AETHER_UI_URL'));
const base = tokenUrl.origin;
const out = env('AETHER_UI_OUT');
fs.mkdirSync(out, { recursive: true });
const shot = (name) => path.join(out, name);

// ---- steps and waiting ----

let passed = 0;
let current = ''; // the step under way
let page = null; // the page a failure screenshot shows

async function step(name, body) {
  current = name;
  const t0 = Date.now();
  await body();
  passed += 1;
  console.log(`ok ${passed} - ${name} (${Date.now() - t0} ms)`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `read` until `accept` takes what it returns; else fails with what was last seen. */
async function until(what, read, accept, timeout = 15_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const seen = await read();
    if (accept(seen)) return seen;
    if (Date.now() > deadline) {
      throw new assert.AssertionError({
        message: `timed out after ${timeout} ms waiting for ${what}`,
        expected: what,
        actual: seen,
        operator: 'until',
      });
    }
    await sleep(50);
  }
}

const sel = (testid) => `[data-testid="${testid}"]`;

/** The trimmed text of the element with `testid`, or null when there is none. */
const text = (p, testid) =>
  p.evaluate((s) => document.querySelector(s)?.textContent.trim() ?? null, sel(testid));

const waitText = (p, testid, want, timeout) =>
  until(`${testid} to read ${JSON.stringify(want)}`, () => text(p, testid), (t) => t === want, timeout);

/** An API call made by the page itself (its cookie, its Origin). */
const pageFetch = (p, method, url) =>
  p.evaluate(async ([m, u]) => {
    const r = await fetch(u, { method: m });
    const t = await r.text();
    return { status: r.status, body: t ? JSON.parse(t) : null };
  }, [method, url]);

async function projectWorkspaces(p, project) {
  const r = await pageFetch(p, 'GET', '/api/workspaces');
  assert.equal(r.status, 200, 'GET /api/workspaces');
  return r.body.filter((w) => w.project_name === project).map((w) => w.id);
}

/** A request from outside the browser, with exactly the headers given (and the right Host). */
function request(method, pathname, headers = {}, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: tokenUrl.hostname, port: tokenUrl.port, method, path: pathname, headers: { host: tokenUrl.host, ...headers } },
      (res) => {
        let data = '';
        res.on('data', (d) => (data += d));
        res.on('end', () => resolve({ status: res.statusCode, body: data }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** Records in window.__seen every state/phase the page shows for workspace `id` (its badge
 * and the status indicator's phase), each change once, in order. */
function watchStates(p, id) {
  return p.evaluate((wsId) => {
    window.__seen = [];
    const q = (t) => document.querySelector(`[data-testid="${t}"]`)?.textContent.trim() ?? '';
    const read = () => {
      const seen = { state: q(`state-${wsId}`), phase: q(`phase-${wsId}`) };
      const last = window.__seen[window.__seen.length - 1];
      if (seen.state && (!last || last.state !== seen.state || last.phase !== seen.phase)) {
        window.__seen.push(seen);
      }
    };
    new MutationObserver(read).observe(document.body, { subtree: true, childList: true, characterData: true });
    read();
  }, id);
}
const seenStates = (p) => p.evaluate(() => window.__seen);
const show = (seen) => seen.map((s) => (s.phase ? `${s.state}: ${s.phase}` : s.state)).join(' → ');

/** The states and phases the indicator's step list shows for workspace `id`. */
const steps = (p, id) =>
  p.$$eval(`${sel(`steps-${id}`)} li`, (lis) =>
    lis.map((li) => ({ state: li.dataset.state, phase: li.dataset.phase, testid: li.dataset.testid })));

function seenBefore(seen, first, then) {
  const a = seen.findIndex(first);
  const b = seen.findIndex(then);
  assert.ok(a >= 0 && b > a, `expected ${first} before ${then} in what the page showed: ${show(seen)}`);
}

// ---- the scenarios ----

async function signIn(browser) {
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  page = await context.newPage();
  const res = await page.goto(tokenUrl.href);
  assert.equal(res.status(), 200, 'the page after the token URL');
  assert.equal(page.url(), `${base}/`, 'the token URL lands on /');
  await page.waitForSelector(sel('app'));
  await until('the login user in the header', () => text(page, 'user'), (t) => !!t);
  return context;
}

/** Fills the create form (a preset first, then the fields given) and submits it. */
async function create(p, { preset, fields = {} }) {
  if (preset) await p.click(sel(`preset-${preset}`));
  for (const [testid, value] of Object.entries(fields)) await p.fill(sel(testid), value);
  await p.click(sel('create-submit'));
}

async function createSmall(p) {
  await create(p, { preset: 'small', fields: { 'create-memory': '256', 'create-volume': '2' } });
  const id = await until('create-ok to name the new workspace', () => text(p, 'create-ok'), (t) => /^Created ws-/.test(t ?? ''));
  return id.replace('Created ', '');
}

async function driver(browser) {
  const project = env('AETHER_UI_PROJECT');
  let context;
  let cookie;

  await step('without the token, / and /api/workspaces answer 401', async () => {
    assert.equal((await request('GET', '/')).status, 401, 'GET / without the cookie');
    assert.equal((await request('GET', '/api/workspaces')).status, 401, 'GET /api/workspaces without the cookie');
  });

  await step('the token URL signs in, lands on / and shows the app', async () => {
    context = await signIn(browser);
  });

  await step('the same token URL in a fresh context answers 401', async () => {
    const other = await browser.newContext();
    const res = await (await other.newPage()).goto(tokenUrl.href);
    assert.equal(res.status(), 401, 'the token URL opened a second time');
    await other.close();
  });

  await step('with the cookie, a foreign Origin and a POST without Origin get 403', async () => {
    const c = (await context.cookies()).find((k) => k.name === 'aether_session');
    assert.ok(c, 'the browser holds the aether_session cookie');
    assert.ok(c.httpOnly, 'the session cookie is HttpOnly');
    cookie = `aether_session=${c.value}`;
    assert.equal((await request('GET', '/api/workspaces', { cookie })).status, 200, 'GET with the cookie');
    const foreign = await request('GET', '/api/workspaces', { cookie, origin: 'http://evil.example' });
    assert.equal(foreign.status, 403, 'GET with the cookie and Origin http://evil.example');
    const post = JSON.stringify({ project });
    const headers = { cookie, 'content-type': 'application/json', 'content-length': Buffer.byteLength(post) };
    assert.equal((await request('POST', '/api/workspaces', headers, post)).status, 403, 'POST without Origin');
    assert.equal(
      (await request('POST', '/api/workspaces', { ...headers, origin: 'http://evil.example' }, post)).status,
      403,
      'POST with Origin http://evil.example',
    );
    assert.deepEqual(await projectWorkspaces(page, project), [], 'workspaces after the refused POSTs');
  });

  await step('memory_mb 100: the daemon\'s refusal shows next to the form, nothing is created', async () => {
    await page.click(sel(`project-${project}`));
    await page.waitForSelector(sel('create-form'));
    assert.equal(page.url(), `${base}/#/p/${encodeURIComponent(project)}`);
    await create(page, { fields: { 'create-memory': '100' } });
    const shown = await until('create-error to mention memory', () => text(page, 'create-error'), (t) => /memory/i.test(t ?? ''));
    const direct = await page.evaluate(async (p) => {
      const r = await fetch('/api/workspaces', {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ project: p, cpu_kind: 'shared', memory_mb: 100 }),
      });
      return { status: r.status, body: await r.json() };
    }, project);
    assert.equal(direct.status, 400, 'the same request made directly');
    assert.equal(shown, direct.body.error, 'the form shows the daemon\'s words exactly');
    assert.deepEqual(await projectWorkspaces(page, project), [], 'workspaces after the refusal');
    assert.equal(await page.locator('[data-testid^="workspace-ws-"]').count(), 0, 'workspace cards');
  });

  let id;
  await step('the small preset with 256 MiB and 2 GiB: a stopped workspace appears', async () => {
    await page.click(sel('preset-small'));
    assert.deepEqual(
      [await page.inputValue(sel('create-cpus')), await page.inputValue(sel('create-memory')), await page.inputValue(sel('create-volume'))],
      ['1', '1024', '10'],
      'the small preset fills cpus, memory and disk',
    );
    id = await createSmall(page);
    await page.waitForSelector(sel(`workspace-${id}`));
    await waitText(page, `state-${id}`, 'stopped');
    assert.equal(await text(page, `hardware-${id}`), '1cpu/256mb');
    assert.equal(await text(page, 'create-error'), null, 'no error after a create that worked');
  });

  await step('Start Workspace: the indicator shows starting, then running', async () => {
    await watchStates(page, id);
    const start = page.locator(sel(`start-${id}`));
    assert.equal(await start.textContent(), 'Start Workspace');
    await start.click();
    // The indicator appears with the first transitional state; on the test driver the boot
    // may be over by the time this looks.
    await page.waitForSelector(sel(`indicator-${id}`), { timeout: 15_000 });
    const before = (await seenStates(page)).length;
    await page.locator(sel(`indicator-${id}`)).screenshot({ path: shot('booting.png') });
    const during = (await seenStates(page)).slice(before - 1);
    const stillStarting = during.every((s) => s.state === 'starting') && (await text(page, `state-${id}`)) === 'starting';
    await waitText(page, `state-${id}`, 'running', 30_000);
    const seen = await seenStates(page);
    seenBefore(seen, (s) => s.state === 'starting', (s) => s.state === 'running');
    const list = await steps(page, id);
    assert.equal(list[0]?.state, 'starting', 'the first step of the indicator');
    assert.equal(list[list.length - 1]?.state, 'running', 'the last step of the indicator');
    // booting.png either way; booting.txt (and this output) says which it shows.
    let note = 'booting.png: taken while the indicator showed starting';
    if (!stillStarting) {
      await page.locator(sel(`indicator-${id}`)).screenshot({ path: shot('booting.png') });
      note = 'booting.png: the boot was over before a screenshot could catch it; this is the indicator\'s step list after it';
    }
    fs.writeFileSync(shot('booting.txt'), `${note}\n`);
    console.log(`   ${note}`);
    console.log(`   the page showed: ${show(seen)}; steps: ${list.map((s) => s.testid).join(', ')}`);
    await page.screenshot({ path: shot('project.png') });
  });

  await step('Stop: stopped', async () => {
    await watchStates(page, id);
    await page.click(sel(`stop-${id}`));
    await waitText(page, `state-${id}`, 'stopped', 30_000);
    console.log(`   the page showed: ${show(await seenStates(page))}`);
  });

  await step('Delete asks first (Escape cancels), then the card goes and the project is empty', async () => {
    await page.click(sel(`delete-${id}`));
    await page.waitForSelector(`${sel('delete-dialog')}[open]`);
    assert.equal(await page.evaluate(() => document.activeElement?.textContent), 'Cancel', 'the dialog focuses Cancel');
    await page.keyboard.press('Escape');
    await page.waitForSelector(sel('delete-dialog'), { state: 'detached' });
    assert.equal(await text(page, `state-${id}`), 'stopped', 'Escape deleted nothing');
    await page.click(sel(`delete-${id}`));
    await page.click(sel('delete-confirm'));
    await page.waitForSelector(sel(`workspace-${id}`), { state: 'detached', timeout: 15_000 });
    assert.deepEqual(await projectWorkspaces(page, project), [], 'workspaces after the delete');
  });

  await step('two tabs: a start in one shows running in the other without a reload', async () => {
    id = await createSmall(page);
    const tab2 = await context.newPage();
    await tab2.goto(`${base}/#/p/${encodeURIComponent(project)}`);
    await waitText(tab2, `state-${id}`, 'stopped');
    await tab2.evaluate(() => (window.__sameDocument = true));
    await page.click(sel(`start-${id}`));
    page = tab2;
    await waitText(tab2, `state-${id}`, 'running', 30_000);
    assert.equal(await tab2.evaluate(() => window.__sameDocument), true, 'tab 2 was not reloaded');
    await tab2.close();
  });

  await step('the terminal WebSocket: refused without Origin, the daemon\'s error in its first frame', async () => {
    page = context.pages()[0];
    const upgrade = {
      cookie,
      connection: 'Upgrade',
      upgrade: 'websocket',
      'sec-websocket-version': '13',
      'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
    };
    const path = `/api/workspaces/${id}/terminal?cols=80&rows=24`;
    assert.equal((await request('GET', path, upgrade)).status, 403, 'upgrade without Origin');
    assert.equal((await request('GET', path, { ...upgrade, origin: 'http://evil.example' })).status, 403, 'upgrade from another Origin');
    // From the page: the test driver's running workspace has no guest to log in to, and a
    // window of 0 columns is refused before that.
    const first = (q) =>
      page.evaluate(
        ([wsId, query]) =>
          new Promise((resolve) => {
            const s = new WebSocket(`ws://${location.host}/api/workspaces/${wsId}/terminal?${query}`);
            s.onmessage = (e) => resolve(JSON.parse(e.data));
            s.onclose = () => resolve('closed without a frame');
          }),
        [id, q],
      );
    const noGuest = await first('cols=80&rows=24');
    assert.equal(noGuest.type, 'error', JSON.stringify(noGuest));
    assert.match(noGuest.message, /test driver runs no guest/);
    const badSize = await first('cols=0&rows=24');
    assert.equal(badSize.type, 'error', JSON.stringify(badSize));
    assert.match(badSize.message, /invalid terminal size 0x24/);
  });

  await step('cleanup: the running workspace is deleted with force', async () => {
    page = context.pages()[0];
    await page.click(sel(`delete-${id}`));
    const confirm = page.locator(sel('delete-confirm'));
    assert.equal(await confirm.isDisabled(), true, 'Delete without force, while running');
    await page.check(sel('delete-force'));
    await confirm.click();
    await page.waitForSelector(sel(`workspace-${id}`), { state: 'detached', timeout: 15_000 });
    assert.deepEqual(await projectWorkspaces(page, project), [], 'workspaces after the cleanup');
    assert.equal(await page.locator(sel('banner')).count(), 0, 'no error banner');
  });
}

async function e2e(browser) {
  const id = env('AETHER_UI_WORKSPACE');
  await step('sign in with the token URL', async () => {
    await signIn(browser);
  });

  await step(`the workspace page of ${id} shows it stopped`, async () => {
    await page.evaluate((w) => (location.hash = `#/w/${w}`), id);
    await page.waitForSelector(sel(`workspace-page-${id}`));
    await waitText(page, `state-${id}`, 'stopped');
  });

  await step('Start Workspace: booting and waiting for ssh are shown, then running', async () => {
    await watchStates(page, id);
    await page.click(sel(`start-${id}`));
    await waitText(page, `state-${id}`, 'running', 300_000);
    const seen = await seenStates(page);
    console.log(`   the page showed: ${show(seen)}`);
    for (const phase of ['booting', 'waiting for ssh']) {
      assert.ok(seen.some((s) => s.phase === phase), `expected phase ${phase} among: ${show(seen)}`);
    }
    seenBefore(seen, (s) => s.phase === 'booting', (s) => s.phase === 'waiting for ssh');
    seenBefore(seen, (s) => s.state === 'starting', (s) => s.state === 'running');
    const list = (await steps(page, id)).map((s) => s.testid);
    for (const t of [`step-${id}-booting`, `step-${id}-waiting-for-ssh`, `step-${id}-running`]) {
      assert.ok(list.includes(t), `expected ${t} in the step list: ${list.join(', ')}`);
    }
  });

  await step('the terminal runs hostname and shows the workspace id', async () => {
    await page.click(sel('terminal-open'));
    await waitText(page, 'terminal-status', 'connected', 30_000);
    await page.waitForSelector(`${sel('terminal')} .xterm-rows`);
    await page.click(sel('terminal'));
    await page.keyboard.type('hostname');
    await page.keyboard.press('Enter');
    const rows = () => page.$$eval(`${sel('terminal')} .xterm-rows > div`, (ds) => ds.map((d) => d.textContent.trim()));
    await until(`a terminal line reading ${id}`, rows, (r) => r.includes(id), 20_000);
    await page.screenshot({ path: shot('terminal.png') });
  });

  await step('the open terminal counts as a connection', async () => {
    const r = await pageFetch(page, 'GET', `/api/workspaces/${id}`);
    assert.equal(r.status, 200);
    assert.ok(r.body.active_connections >= 1, `expected active_connections ≥ 1, saw ${r.body.active_connections}`);
  });

  const shellPids = async () =>
    (await termRows()).flatMap((r) => r.match(/^pid=(\d+)$/)?.slice(1) ?? []);
  const termRows = () =>
    page.$$eval(`${sel('terminal')} .xterm-rows > div`, (ds) => ds.map((d) => d.textContent.trim()));
  let pid;
  await step('a reload reconnects to the same shell, its output replayed', async () => {
    await page.click(sel('terminal'));
    await page.keyboard.type('echo pid=$$');
    await page.keyboard.press('Enter');
    [pid] = await until('a line pid=N', shellPids, (p) => p.length === 1, 20_000);
    await page.reload();
    await page.waitForSelector(sel(`workspace-page-${id}`));
    await waitText(page, 'terminal-status', 'connected', 30_000);
    // The replay brings the earlier line back before anything new is typed.
    await until(`the replayed line pid=${pid}`, shellPids, (p) => p.includes(pid), 20_000);
    await page.click(sel('terminal'));
    await page.keyboard.type('echo pid=$$');
    await page.keyboard.press('Enter');
    const pids = await until('a second line pid=N', shellPids, (p) => p.length >= 2, 20_000);
    assert.deepEqual(pids, [pid, pid], 'the shell after the reload is the one before it');
  });

  await step('exit 5 in the shell: the page says so and the connection is gone', async () => {
    await page.keyboard.type('exit 5');
    await page.keyboard.press('Enter');
    await waitText(page, 'terminal-status', 'the shell ended', 20_000);
    await until('the line about code 5', termRows, (r) => r.some((l) => l.includes('the shell ended with code 5')));
    await until(
      'active_connections 0',
      async () => (await pageFetch(page, 'GET', `/api/workspaces/${id}`)).body.active_connections,
      (n) => n === 0,
      20_000,
    );
  });

  await step('close the terminal and stop the workspace again', async () => {
    await page.click(sel('terminal-close'));
    await watchStates(page, id);
    await page.click(sel(`stop-${id}`));
    await waitText(page, `state-${id}`, 'stopped', 300_000);
    console.log(`   the page showed: ${show(await seenStates(page))}`);
  });
}

// ---- run ----

const browser = await chromium.launch({
  executablePath: process.env.AETHER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = 0;
try {
  await SCENARIOS[scenario](browser);
} catch (e) {
  failed = 1;
  console.log(`not ok ${passed + 1} - ${current}`);
  if (e instanceof assert.AssertionError) {
    console.log(`   ${e.message.split('\n')[0]}`);
    console.log(`   expected: ${inspect(e.expected, { depth: 4, breakLength: Infinity })}`);
    console.log(`   seen:     ${inspect(e.actual, { depth: 4, breakLength: Infinity })}`);
  } else {
    console.log(`   ${e.stack}`);
  }
  if (page && !page.isClosed()) {
    await page.screenshot({ path: shot('failure.png') }).then(
      () => console.log(`   screenshot: ${shot('failure.png')}`),
      (err) => console.log(`   no screenshot: ${err.message}`),
    );
  }
}
await browser.close();
console.log(`${scenario}: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

// The workspace page, #/w/ID: every field `aether workspace get` shows, the terminal, the
// console log and the workspace's tasks.

import { html } from 'htm/preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { api, terminalSession } from './api.js';
import { dateTime, duration, hardwareLong } from './format.js';
import { report } from './store.js';
import {
  Actions, ErrorDetails, IdleClock, Indicator, plainText, StateBadge,
} from './workspace.js';

const orDash = (v) => (v === '' || v == null ? '-' : v);

/** The workspace object as label/value rows, in the order `aether workspace get` uses. */
function rows(ws) {
  const h = ws.hardware;
  return [
    ['id', 'ID', ws.id],
    ['project', 'Project', `${ws.project_name} (${ws.project_id})`],
    ['state', 'State', html`<span class="badge state-${ws.state}">${ws.state}</span>`],
    ['reason', 'Reason', orDash(ws.reason)],
    ['hardware', 'Hardware', h ? hardwareLong(h) : '-'],
    ['dedicated_cpus', 'Dedicated CPUs', ws.dedicated_cpus?.length ? ws.dedicated_cpus.join(',') : '-'],
    ['pending_hardware', 'Pending hardware',
      ws.pending_hardware ? `${hardwareLong(ws.pending_hardware)} (applied at next start)` : '-'],
    ['ip_addresses', 'IP addresses', ws.ip_addresses?.length ? ws.ip_addresses.join(', ') : '-'],
    ['image', 'Image', orDash(ws.image)],
    ['login_user', 'Login user', orDash(ws.login_user)],
    ['phase', 'Phase', orDash(ws.phase)],
    ['idle_timeout_secs', 'Idle timeout', ws.idle_timeout_secs === 0 ? 'never' : duration(ws.idle_timeout_secs)],
    ['idle', 'Idle clock', html`<${IdleClock} ws=${ws} />`],
    ['active_connections', 'Connections', ws.active_connections],
    ['running_tasks', 'Running tasks', ws.running_tasks],
    ['idle_since', 'Idle since', dateTime(ws.idle_since)],
    ['stops_at', 'Stops at', dateTime(ws.stops_at)],
    ['created_at', 'Created', dateTime(ws.created_at)],
    ['domain_name', 'Domain', orDash(ws.domain_name)],
    ['generation', 'Generation', ws.generation],
    ['owner_uid', 'Owner uid', ws.owner_uid],
    ['ssh_host_public_key', 'SSH host key', html`<code class="key">${orDash(ws.ssh_host_public_key)}</code>`],
  ];
}

/** Text fetched by `load` into a scrolling <pre> that follows its end; `deps` refetch it. */
function LogBox({ title, load, deps, testid, label, every }) {
  const [text, setText] = useState(null);
  const [tick, setTick] = useState(0);
  const pre = useRef();
  const follow = useRef(true); // at the end: new text scrolls into view
  useEffect(() => {
    let live = true;
    load().then((t) => live && setText(plainText(t)), report);
    const timer = every && setTimeout(() => setTick((n) => n + 1), every);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [...deps, tick]);
  useEffect(() => {
    if (follow.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text]);
  const onScroll = (e) => {
    const el = e.currentTarget;
    follow.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
  };
  return html`
    <div class="card-head">
      ${title}
      <button type="button" class="small" onClick=${() => setTick((n) => n + 1)}
        data-testid="${testid}-refresh" aria-label="Refresh the ${label}">Refresh</button>
    </div>
    <pre class="log tall" ref=${pre} tabindex="0" aria-label=${label} onScroll=${onScroll}
      data-testid=${testid}>${text === null ? 'loading…' : text || '(empty)'}</pre>`;
}

function Tasks({ ws }) {
  const [tasks, setTasks] = useState(null);
  const [tick, setTick] = useState(0);
  const [shown, setShown] = useState(null);
  useEffect(() => {
    let live = true;
    api.tasks(ws.id).then((t) => live && setTasks(t), report);
    return () => (live = false);
  }, [ws.id, ws.running_tasks, ws.generation, tick]);
  return html`
    <section class="card" aria-labelledby="tasks-title">
      <div class="card-head">
        <h2 id="tasks-title">Tasks</h2>
        <button type="button" class="small" onClick=${() => setTick((n) => n + 1)}
          data-testid="tasks-refresh" aria-label="Refresh the tasks">Refresh</button>
      </div>
      ${tasks === null ? html`<p class="muted">loading…</p>`
        : tasks.length === 0 ? html`<p class="muted" data-testid="tasks-empty">No tasks. <code>aether exec</code> runs one.</p>`
        : html`
          <table class="tasks" data-testid="tasks">
            <thead><tr><th>ID</th><th>Command</th><th>State</th><th>Exit</th><th>Started</th><th>Ended</th><th></th></tr></thead>
            <tbody>
              ${tasks.map((t) => html`
                <tr key=${t.id} data-testid="task-${t.id}">
                  <td><code>${t.id}</code></td>
                  <td><code>${t.argv.join(' ')}</code></td>
                  <td><span class="badge task-${t.state}">${t.state}</span></td>
                  <td>${t.exit_code ?? '-'}</td>
                  <td>${dateTime(t.started_at)}</td>
                  <td>${dateTime(t.ended_at)}</td>
                  <td>
                    <button type="button" class="small" aria-expanded=${shown === t.id}
                      data-testid="task-log-${t.id}" onClick=${() => setShown(shown === t.id ? null : t.id)}>
                      ${shown === t.id ? 'Hide log' : 'View log'}
                    </button>
                  </td>
                </tr>`)}
            </tbody>
          </table>`}
      ${shown && html`
        <${LogBox} title=${html`<h3>Log of <code>${shown}</code></h3>`} load=${() => api.taskLog(shown)}
          deps=${[shown, tasks]} testid="task-log" label="log of ${shown}" />`}
    </section>`;
}

const STATUS_TEXT = {
  connecting: 'connecting…',
  connected: 'connected',
  reconnecting: 'reconnecting…',
  exited: 'the shell ended',
  error: 'failed',
  disconnected: 'disconnected',
};

function TerminalPanel({ ws }) {
  const running = ws.state === 'running';
  const [open, setOpen] = useState(() => running && terminalSession.get(ws.id) !== null);
  const [status, setStatus] = useState('');
  const box = useRef();
  const ctl = useRef(null);
  const runningNow = useRef(running);
  runningNow.current = running;

  useEffect(() => {
    if (!open) return undefined;
    let gone = false;
    import('./terminal.js').then(({ openTerminal }) => {
      if (gone) return;
      ctl.current = openTerminal(box.current, ws.id, {
        onStatus: setStatus,
        mayReconnect: () => runningNow.current,
      });
    }, (e) => report(new Error(`cannot load the terminal: ${e.message}`)));
    return () => {
      gone = true;
      ctl.current?.detach();
      ctl.current = null;
    };
  }, [open, ws.id]);

  const close = () => {
    ctl.current?.close();
    ctl.current = null;
    setOpen(false);
    setStatus('');
  };
  const again = status === 'exited' || status === 'error' || status === 'disconnected';
  return html`
    <section class="card terminal-card" aria-labelledby="terminal-title">
      <div class="card-head">
        <h2 id="terminal-title">Terminal</h2>
        ${open && html`<span class="term-status status-${status}" data-testid="terminal-status"
          role="status">${STATUS_TEXT[status] || ''}</span>`}
        <div class="card-tools">
          ${open && again && running && html`<button type="button" class="small"
            data-testid="terminal-reconnect" onClick=${() => ctl.current?.reconnect()}>
            ${status === 'exited' ? 'New shell' : 'Reconnect'}</button>`}
          ${open
            ? html`<button type="button" class="small" data-testid="terminal-close" onClick=${close}>Close terminal</button>`
            : html`<button type="button" class="primary" data-testid="terminal-open" disabled=${!running}
                onClick=${() => setOpen(true)}>Open terminal</button>`}
        </div>
      </div>
      ${open
        ? html`<div class="terminal" ref=${box} data-testid="terminal" aria-label="Terminal of ${ws.id}"></div>`
        : html`<p class="muted">${running
            ? `A shell of ${ws.login_user || 'the login user'} in ${ws.id}, over SSH through the daemon.`
            : 'The terminal opens once the workspace is running.'}</p>`}
    </section>`;
}

export function WorkspacePage({ id, ws, transition, synced }) {
  if (!ws) {
    return html`
      <div class="page">
        <h1 tabindex="-1">${id}</h1>
        <p class="muted" data-testid="workspace-missing">${synced ? 'There is no such workspace (or it was deleted).' : 'loading…'}</p>
      </div>`;
  }
  return html`
    <div class="page" data-testid="workspace-page-${ws.id}">
      <p class="crumbs"><a href="#/p/${encodeURIComponent(ws.project_name)}">${ws.project_name}</a> / ${ws.id}</p>
      <div class="page-head">
        <h1 tabindex="-1">${ws.id}</h1>
        <${StateBadge} ws=${ws} />
        <${Actions} ws=${ws} />
      </div>
      ${transition && html`<${Indicator} ws=${ws} transition=${transition} />`}
      ${ws.state === 'error' && html`<${ErrorDetails} ws=${ws} />`}
      <div class="detail-grid">
        <section class="card" aria-labelledby="details-title">
          <h2 id="details-title">Details</h2>
          <dl class="fields" data-testid="fields">
            ${rows(ws).map(([key, label, value]) => html`
              <dt>${label}</dt><dd data-testid="field-${key}">${value}</dd>`)}
          </dl>
        </section>
        <${TerminalPanel} key=${ws.id} ws=${ws} />
      </div>
      <section class="card" aria-labelledby="console-title">
        <${LogBox} title=${html`<h2 id="console-title">Console log</h2>`}
          load=${() => api.console(ws.id)} deps=${[ws.id, ws.state]} testid="console"
          label="console log of ${ws.id}" every=${ws.state === 'starting' ? 2000 : 0} />
      </section>
      <${Tasks} ws=${ws} />
    </div>`;
}

// One workspace: its state badge, actions, idle clock, the status indicator of a boot or
// stop, and what an error left (reason and console tail).

import { html } from 'htm/preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { api } from './api.js';
import {
  date, elapsed, hardwareShort, idleText, slug, useNow,
} from './format.js';
import {
  deleteWorkspace, dismissTransition, report, startWorkspace, stopWorkspace, TRANSITIONAL,
} from './store.js';

const canStart = (s) => s === 'stopped' || s === 'error';
const canStop = (s) => s === 'running' || s === 'starting';
const deletableAsIs = (s) => s === 'stopped' || s === 'error' || s === 'stop_failed';

/** Console or log text for a <pre>: terminal escape sequences and stray control characters
 * removed, carriage-return overwrites resolved to what was left on the line. */
export function plainText(text) {
  return text
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]/g, '')
    .split('\n')
    .map((line) => line.split('\r').filter(Boolean).pop() ?? '')
    .join('\n')
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
}

const lastLines = (text, n) => text.split('\n').slice(-n).join('\n');

export function StateBadge({ ws }) {
  return html`<span class="badge state-${ws.state}" data-testid="state-${ws.id}">${ws.state}</span>`;
}

export function IdleClock({ ws }) {
  const now = useNow(1000);
  const title = ws.stops_at > 0 ? `stops at ${new Date(ws.stops_at * 1000).toLocaleString()}` : undefined;
  return html`<span data-testid="idle-${ws.id}" title=${title}>${idleText(ws, now)}</span>`;
}

/** Start, Stop and Delete, each enabled only when the state allows it. */
export function Actions({ ws }) {
  const [busy, setBusy] = useState(false);
  const [confirming, setConfirming] = useState(false);
  const run = (action) => async () => {
    setBusy(true);
    await action();
    setBusy(false);
  };
  const s = ws.state;
  return html`
    <div class="actions">
      <button class="primary" data-testid="start-${ws.id}" disabled=${busy || !canStart(s)}
        onClick=${run(() => startWorkspace(ws.id))}>Start Workspace</button>
      ${s === 'stop_failed'
        ? html`<button data-testid="force-stop-${ws.id}" disabled=${busy}
            onClick=${run(() => stopWorkspace(ws.id, true))}>Force stop</button>`
        : html`<button data-testid="stop-${ws.id}" disabled=${busy || !canStop(s)}
            onClick=${run(() => stopWorkspace(ws.id))}>Stop</button>`}
      <button class="danger-outline" data-testid="delete-${ws.id}" disabled=${busy}
        onClick=${() => setConfirming(true)}>Delete</button>
      ${confirming && html`<${DeleteDialog} ws=${ws} onClose=${() => setConfirming(false)}
        onDelete=${(force) => run(() => deleteWorkspace(ws.id, force))()} />`}
    </div>`;
}

/** Asks before deleting; a workspace that is not stopped needs "force" (its VM is destroyed). */
function DeleteDialog({ ws, onClose, onDelete }) {
  const ref = useRef();
  const [force, setForce] = useState(false);
  const needsForce = !deletableAsIs(ws.state);
  useEffect(() => {
    const opener = document.activeElement;
    ref.current.showModal();
    return () => opener?.isConnected && opener.focus();
  }, []);
  const close = () => ref.current.close();
  const confirm = () => {
    close();
    onDelete(force);
  };
  const title = `delete-title-${ws.id}`;
  return html`
    <dialog ref=${ref} class="dialog" onClose=${onClose} aria-labelledby=${title}
      data-testid="delete-dialog">
      <h2 id=${title}>Delete ${ws.id}?</h2>
      <p>Its VM and disk are removed for good. This cannot be undone.</p>
      ${ws.state !== 'stopped' && html`
        <label class="check">
          <input type="checkbox" checked=${force} data-testid="delete-force"
            onChange=${(e) => setForce(e.currentTarget.checked)} />
          Force: ${needsForce
            ? `the workspace is ${ws.state}; destroy its VM first`
            : 'destroy whatever is left of its VM'}
        </label>`}
      <div class="dialog-buttons">
        <button autofocus onClick=${close}>Cancel</button>
        <button class="danger" data-testid="delete-confirm" disabled=${needsForce && !force}
          onClick=${confirm}>Delete</button>
      </div>
    </dialog>`;
}

const OUTCOME = {
  'starting:running': 'Started',
  'stopping:stopped': 'Stopped',
};

/** The status of a boot or stop: the current state and phase, the time since it began, and
 * every state/phase the stream reported on the way, each ticked off once passed. */
export function Indicator({ ws, transition: t }) {
  const active = !t.endedAt;
  const now = useNow(active ? 200 : 60_000);
  const took = elapsed((active ? now : t.endedAt) - t.startedAt);
  const last = t.steps[t.steps.length - 1];
  const failed = !active && !OUTCOME[`${t.kind}:${last.state}`];
  let headline;
  if (active) headline = t.kind === 'starting' ? 'Starting' : 'Stopping';
  else if (failed) headline = `${t.kind === 'starting' ? 'Start' : 'Stop'} ended in ${last.state} after`;
  else headline = `${OUTCOME[`${t.kind}:${last.state}`]} in`;
  return html`
    <section class="indicator ${active ? 'active' : failed ? 'failed' : 'done'}"
      data-testid="indicator-${ws.id}" data-active=${active} aria-label="Status of ${ws.id}">
      <div class="indicator-head" role="status">
        ${active && html`<span class="pulse" aria-hidden="true"></span>`}
        <strong>${headline}</strong>
        ${active && html`
          <span class="indicator-now">
            <span data-testid="indicator-state-${ws.id}">${ws.state}</span>
            ${ws.phase && html` · <span data-testid="phase-${ws.id}">${ws.phase}</span>`}
          </span>`}
        <span class="elapsed" data-testid="elapsed-${ws.id}">${took}</span>
        ${!active && html`
          <button class="icon" aria-label="Dismiss the status of ${ws.id}"
            data-testid="indicator-dismiss-${ws.id}"
            onClick=${() => dismissTransition(ws.id)}>×</button>`}
      </div>
      <ol class="steps" data-testid="steps-${ws.id}" aria-label="Steps">
        ${t.steps.map((step, i) => {
          const current = i === t.steps.length - 1;
          const mark = current && active ? 'current' : current && failed ? 'failed' : 'done';
          const label = step.phase || step.state;
          return html`
            <li class="step ${mark}" data-testid="step-${ws.id}-${slug(label)}"
              data-state=${step.state} data-phase=${step.phase}>
              <span class="mark" aria-hidden="true">${{ current: '', failed: '✕', done: '✓' }[mark]}</span>
              ${label}
            </li>`;
        })}
      </ol>
    </section>`;
}

/** Why the workspace failed, and the last lines its console printed. */
export function ErrorDetails({ ws }) {
  const [tail, setTail] = useState(null);
  const pre = useRef();
  useEffect(() => {
    let live = true;
    api.console(ws.id).then((text) => live && setTail(lastLines(plainText(text).trimEnd(), 30)), report);
    return () => (live = false);
  }, [ws.id, ws.generation]);
  useEffect(() => {
    pre.current.scrollTop = pre.current.scrollHeight;
  }, [tail]);
  return html`
    <div class="error-box" data-testid="error-${ws.id}">
      <p class="reason" data-testid="reason-${ws.id}">${ws.reason || 'The daemon gave no reason.'}</p>
      <details open>
        <summary>Console, last 30 lines</summary>
        <pre class="log" ref=${pre} tabindex="0" aria-label="Console of ${ws.id}, last 30 lines"
          data-testid="console-tail-${ws.id}">${tail === null ? 'loading…' : tail || '(empty)'}</pre>
      </details>
    </div>`;
}

/** A workspace in a list: its facts, actions, status indicator and error. */
export function WorkspaceCard({ ws, transition }) {
  const title = `title-${ws.id}`;
  return html`
    <article class="ws-card state-${ws.state}" data-testid="workspace-${ws.id}"
      data-workspace-id=${ws.id} aria-labelledby=${title}>
      <div class="ws-row">
        <a href="#/w/${ws.id}" id=${title} class="ws-id">${ws.id}</a>
        <${StateBadge} ws=${ws} />
        <${Actions} ws=${ws} />
      </div>
      <dl class="facts">
        <div><dt>hardware</dt><dd data-testid="hardware-${ws.id}">${hardwareShort(ws.hardware)}</dd></div>
        <div><dt>address</dt><dd data-testid="address-${ws.id}">${ws.ip_addresses?.[0] || '-'}</dd></div>
        <div><dt>created</dt><dd data-testid="created-${ws.id}">${date(ws.created_at)}</dd></div>
        <div><dt>idle</dt><dd><${IdleClock} ws=${ws} /></dd></div>
      </dl>
      ${transition && html`<${Indicator} ws=${ws} transition=${transition} />`}
      ${ws.state === 'error'
        ? html`<${ErrorDetails} ws=${ws} />`
        : ws.reason && !TRANSITIONAL.has(ws.state) &&
          html`<p class="reason muted" data-testid="reason-${ws.id}">${ws.reason}</p>`}
    </article>`;
}

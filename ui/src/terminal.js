// The workspace terminal: xterm.js on the WebSocket of API.md ("The terminal"). Loaded only
// when a terminal is opened, so the page itself stays small.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import { terminalSession, terminalUrl } from './api.js';

/** Waits before each reconnect after an unexpected close, in ms; then it gives up. */
const BACKOFF = [500, 1000, 2000, 4000, 8000];

const note = (text) => `\r\n\x1b[2m[${text}]\x1b[0m\r\n`;

/**
 * Opens a terminal of workspace `id` in `el`.
 * `onStatus(s)` hears connecting | connected | reconnecting | exited | error | disconnected;
 * `mayReconnect()` says whether a dropped connection is worth retrying (the workspace runs).
 * Returns {focus, reconnect, detach, close}: detach keeps the session for a later return,
 * close ends it for this page.
 */
export function openTerminal(el, id, { onStatus, mayReconnect }) {
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#1b1f24', foreground: '#e6e8eb', cursor: '#e6e8eb' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();

  const encoder = new TextEncoder();
  let sock = null;
  let tries = 0;
  let retryTimer = 0;
  let stopped = false;

  const send = (data) => {
    if (sock?.readyState === WebSocket.OPEN) sock.send(data);
  };
  const sendSize = () => send(JSON.stringify({ type: 'resize', cols: term.cols, rows: term.rows }));
  term.onData((data) => send(encoder.encode(data)));
  // Raw bytes some terminal modes produce (old mouse reports): one byte per character.
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(sendSize);
  const resizes = new ResizeObserver(() => fit.fit());
  resizes.observe(el);

  function connect() {
    const session = terminalSession.get(id);
    const s = new WebSocket(terminalUrl(id, term.cols, term.rows, session));
    s.binaryType = 'arraybuffer';
    sock = s;
    let opened = false; // the WebSocket handshake succeeded
    let joined = false; // the server named the session
    let over = false; // the server said the shell ended or failed: no reconnect
    onStatus(session ? 'reconnecting' : 'connecting');

    s.onopen = () => (opened = true);
    s.onmessage = (e) => {
      if (typeof e.data !== 'string') {
        term.write(new Uint8Array(e.data));
        return;
      }
      let m;
      try {
        m = JSON.parse(e.data);
      } catch {
        return;
      }
      if (m.type === 'session') {
        joined = true;
        tries = 0;
        // The same session again: its output is replayed, so start from a clean screen.
        if (m.id === session) term.reset();
        terminalSession.set(id, m.id);
        sendSize();
        onStatus('connected');
      } else if (m.type === 'exit') {
        over = true;
        terminalSession.clear(id);
        term.write(note(m.code == null ? 'the shell ended' : `the shell ended with code ${m.code}`));
        onStatus('exited');
      } else if (m.type === 'error') {
        over = true;
        if (!joined) terminalSession.clear(id);
        term.write(`\r\n\x1b[31m[${m.message}]\x1b[0m\r\n`);
        onStatus('error');
      }
    };

    s.onclose = () => {
      if (sock !== s || stopped || over) return;
      // A stored session the server did not take up has expired: the next try starts afresh.
      if (session && !joined) terminalSession.clear(id);
      // A refused handshake tells the page no status or reason, only that it failed.
      if (tries >= BACKOFF.length || !mayReconnect()) {
        term.write(note(opened ? 'connection closed' : 'cannot connect to the terminal'));
        onStatus('disconnected');
        return;
      }
      term.write(note(opened ? 'connection lost; reconnecting' : 'cannot connect; trying again'));
      onStatus('reconnecting');
      retryTimer = setTimeout(connect, BACKOFF[tries++]);
    };
  }

  function stop() {
    stopped = true;
    clearTimeout(retryTimer);
    resizes.disconnect();
    sock?.close(1000);
    term.dispose();
  }

  connect();
  term.focus();
  return {
    focus: () => term.focus(),
    reconnect: () => {
      clearTimeout(retryTimer);
      tries = 0;
      if (sock && sock.readyState !== WebSocket.CLOSED) sock.close(1000);
      connect();
    },
    detach: stop,
    close: () => {
      stop();
      terminalSession.clear(id);
    },
  };
}

// Calls to `aether ui`'s API (ui/API.md). A failed call throws an ApiError carrying the
// daemon's words; a 401 also tells the store that the session is over.

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};

/** Sets what happens when any call answers 401. */
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

/** The error text of a failed response: the JSON body's `error`, else the body, else the status. */
async function errorOf(res) {
  const text = await res.text();
  let code;
  try {
    const body = JSON.parse(text);
    if (typeof body.error === 'string') return new ApiError(body.error, res.status, body.code);
    code = body.code;
  } catch {
    // Not JSON: the text itself is the message.
  }
  return new ApiError(text.trim() || `${res.status} ${res.statusText}`, res.status, code);
}

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`cannot reach aether ui: ${e.message}`, 0);
  }
  if (res.status === 401) onUnauthorized();
  if (!res.ok) throw await errorOf(res);
  if (res.status === 204) return null;
  const type = res.headers.get('content-type') || '';
  return type.includes('json') ? res.json() : res.text();
}

const enc = encodeURIComponent;

export const api = {
  session: () => call('GET', '/api/session'),
  projects: () => call('GET', '/api/projects'),
  images: () => call('GET', '/api/images'),
  create: (body) => call('POST', '/api/workspaces', body),
  start: (id) => call('POST', `/api/workspaces/${enc(id)}/start`),
  stop: (id, force) => call('POST', `/api/workspaces/${enc(id)}/stop`, { force }),
  remove: (id, force) =>
    call('DELETE', `/api/workspaces/${enc(id)}${force ? '?force=true' : ''}`),
  console: (id) => call('GET', `/api/workspaces/${enc(id)}/console`),
  tasks: (id) => call('GET', `/api/workspaces/${enc(id)}/tasks`),
  taskLog: (id) => call('GET', `/api/tasks/${enc(id)}/log`),
};

// ---- the terminal's WebSocket ----

/** The terminal WebSocket's URL for a workspace (API.md, "The terminal"). */
export function terminalUrl(id, cols, rows, session) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const q = new URLSearchParams({ cols, rows });
  if (session) q.set('session', session);
  return `${scheme}//${location.host}/api/workspaces/${enc(id)}/terminal?${q}`;
}

/** The terminal session of each workspace, kept for this tab so a reload or a dropped
 * connection gets the same shell back (the server keeps it for 60 s). */
export const terminalSession = {
  get: (id) => sessionStorage.getItem(`aether-terminal-${id}`),
  set: (id, session) => sessionStorage.setItem(`aether-terminal-${id}`, session),
  clear: (id) => sessionStorage.removeItem(`aether-terminal-${id}`),
};

// The page's state: what the API answered, the workspaces as /api/events reports them, the
// boot/stop transitions seen on that stream, and the error banners. Components read it with
// useStore() and change it only through the functions exported here.

import { useEffect, useReducer } from 'preact/hooks';
import { api, whenUnauthorized } from './api.js';

export const TRANSITIONAL = new Set(['starting', 'stopping']);

let state = {
  session: null, // {login_user, version, daemon_version}
  projects: null, // [project], null until loaded
  images: [],
  workspaces: {}, // id → workspace, from the event stream
  synced: false, // a first snapshot has arrived
  // id → {kind: 'starting'|'stopping', startedAt, endedAt, steps: [{state, phase}]}: the
  // newest transition of each workspace, kept after it ends until the next one or a dismiss.
  transitions: {},
  connection: 'connecting', // 'live' | 'connecting'
  banners: [], // [{id, text}]
  sessionEnded: false,
};
const listeners = new Set();

function set(patch) {
  state = { ...state, ...patch };
  for (const l of listeners) l();
}

/** The current state; the calling component renders again whenever it changes. */
export function useStore() {
  const [, rerender] = useReducer((n) => n + 1, 0);
  useEffect(() => {
    listeners.add(rerender);
    return () => listeners.delete(rerender);
  }, []);
  return state;
}

// ---- banners ----

let bannerSeq = 0;

function showError(text) {
  if (state.banners.some((b) => b.text === text)) return;
  set({ banners: [...state.banners, { id: ++bannerSeq, text }] });
}

export function dismissBanner(id) {
  set({ banners: state.banners.filter((b) => b.id !== id) });
}

/** Shows a failed call's words in a banner (a 401 has its own, from whenUnauthorized). */
export function report(e) {
  if (e.status !== 401) showError(e.message);
}

whenUnauthorized(() => {
  if (!state.sessionEnded) set({ sessionEnded: true });
});

// ---- transitions ----

/** `transitions` with `ws`'s new state and phase recorded: a transition begins when the
 * state becomes starting or stopping, gains a step for each new state/phase pair, and ends
 * (with that final state as its last step) when the state is no longer transitional. */
function track(transitions, ws) {
  const t = transitions[ws.id];
  const step = { state: ws.state, phase: ws.phase || '' };
  const now = Date.now();
  if (TRANSITIONAL.has(ws.state)) {
    if (!t || t.endedAt || t.kind !== ws.state) {
      return { ...transitions, [ws.id]: { kind: ws.state, startedAt: now, endedAt: 0, steps: [step] } };
    }
    const last = t.steps[t.steps.length - 1];
    if (last.state === step.state && last.phase === step.phase) return transitions;
    return { ...transitions, [ws.id]: { ...t, steps: [...t.steps, step] } };
  }
  if (t && !t.endedAt) {
    return { ...transitions, [ws.id]: { ...t, endedAt: now, steps: [...t.steps, step] } };
  }
  return transitions;
}

export function dismissTransition(id) {
  const { [id]: _, ...rest } = state.transitions;
  set({ transitions: rest });
}

// ---- workspaces ----

function upsert(ws) {
  if (!state.projects?.some((p) => p.id === ws.project_id)) loadProjects();
  set({
    workspaces: { ...state.workspaces, [ws.id]: ws },
    transitions: track(state.transitions, ws),
  });
}

function remove(id) {
  if (!(id in state.workspaces)) return;
  const { [id]: _, ...workspaces } = state.workspaces;
  const { [id]: __, ...transitions } = state.transitions;
  set({ workspaces, transitions });
}

/** Takes a workspace an API call answered, unless the stream already told something newer. */
function answered(ws) {
  const known = state.workspaces[ws.id];
  if (!known || ws.generation > known.generation) upsert(ws);
}

/** Replaces every workspace with a new connection's snapshot. */
function replaceAll(snapshot) {
  let transitions = {};
  for (const ws of Object.values(snapshot)) {
    transitions[ws.id] = state.transitions[ws.id];
    transitions = track(transitions, ws);
    if (!transitions[ws.id]) delete transitions[ws.id];
  }
  set({ workspaces: snapshot, transitions, synced: true });
}

/** Follows /api/events for as long as the page is open. */
function followEvents() {
  let snapshot = {};
  let retry = 0;
  const connect = () => {
    const es = new EventSource('/api/events');
    es.onopen = () => {
      retry = 0;
      snapshot = {};
      set({ connection: 'live' });
    };
    es.addEventListener('workspace', (e) => {
      const { kind, workspace } = JSON.parse(e.data);
      if (kind === 'snapshot') snapshot[workspace.id] = workspace;
      else if (kind === 'snapshot_end') {
        replaceAll(snapshot);
        loadProjects();
      } else if (kind === 'changed') upsert(workspace);
      else if (kind === 'deleted') remove(workspace.id);
    });
    es.addEventListener('error', (e) => {
      if (e.data !== undefined) {
        // `event: error` from the server: the daemon ended the watch.
        let text = e.data;
        try {
          text = JSON.parse(e.data).error;
        } catch {
          // Not JSON: show it as it came.
        }
        showError(`The live updates stopped: ${text}`);
        return;
      }
      set({ connection: 'connecting' });
      if (es.readyState !== EventSource.CLOSED) return; // the browser reconnects by itself
      // Refused (not a dropped connection): find out whether the session is over, else retry.
      const again = () => setTimeout(connect, Math.min(30, 2 ** retry++) * 1000);
      api.session().then(again, (err) => err.status !== 401 && again());
    });
  };
  connect();
}

// ---- loading and actions ----

let projectsLoading = null;

function loadProjects() {
  projectsLoading ??= api
    .projects()
    .then((projects) => set({ projects }), report)
    .finally(() => (projectsLoading = null));
  return projectsLoading;
}

export function loadAll() {
  api.session().then((session) => set({ session }), report);
  api.images().then((images) => set({ images }), report);
  loadProjects();
  followEvents();
}

/** Runs an action on a workspace; a failure goes to the banner. */
async function act(call) {
  try {
    const ws = await call();
    if (ws) answered(ws);
  } catch (e) {
    report(e);
  }
}

export const startWorkspace = (id) => act(() => api.start(id));
export const stopWorkspace = (id, force = false) => act(() => api.stop(id, force));
export const deleteWorkspace = (id, force) =>
  act(async () => {
    await api.remove(id, force);
    remove(id);
  });

/** Creates a workspace; throws the ApiError for the form to show. */
export async function createWorkspace(body) {
  const ws = await api.create(body);
  answered(ws);
  return ws;
}

// The page's frame: header, banners, the project list, and the view the URL hash names
// (#/ all projects, #/p/NAME a project, #/w/ID a workspace).

import { html } from 'htm/preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { CreateForm } from './create.js';
import { WorkspacePage } from './detail.js';
import { dismissBanner, useStore } from './store.js';
import { WorkspaceCard } from './workspace.js';

function parseHash(hash) {
  const m = /^#\/(p|w)\/(.+)$/.exec(hash);
  if (!m) return { view: 'home' };
  const arg = decodeURIComponent(m[2]);
  return m[1] === 'p' ? { view: 'project', name: arg } : { view: 'workspace', id: arg };
}

function useRoute() {
  const [route, setRoute] = useState(() => parseHash(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseHash(location.hash));
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return route;
}

const byCreation = (a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id);

function Banners({ banners, sessionEnded }) {
  if (!banners.length && !sessionEnded) return null;
  return html`
    <div class="banners" role="region" aria-label="Messages">
      ${sessionEnded && html`
        <div class="banner session" role="alert" data-testid="banner">
          <span>Session ended: run \`aether ui\` again and open the new link</span>
        </div>`}
      ${banners.map((b) => html`
        <div class="banner" role="alert" data-testid="banner" key=${b.id}>
          <span>${b.text}</span>
          <button class="icon" aria-label="Dismiss" data-testid="banner-dismiss"
            onClick=${() => dismissBanner(b.id)}>×</button>
        </div>`)}
    </div>`;
}

const CONNECTION = {
  live: ['live', 'Live updates from the daemon'],
  connecting: ['reconnecting…', 'Reconnecting to the live updates'],
  ended: ['session ended', 'This page no longer gets updates'],
};

function Header({ session, connection }) {
  const [label, title] = CONNECTION[connection];
  return html`
    <header class="top">
      <a class="brand" href="#/">aether</a>
      <span class="conn conn-${connection}" data-testid="connection" title=${title}>${label}</span>
      <span class="spacer"></span>
      ${session && html`
        <span class="user" data-testid="user" title="aether ${session.version}, aetherd ${session.daemon_version}">
          ${session.login_user}
        </span>`}
    </header>`;
}

function ProjectNav({ projects, workspaces, current }) {
  const all = Object.values(workspaces);
  return html`
    <nav class="side" aria-label="Projects">
      <h2>Projects</h2>
      ${projects === null ? html`<p class="muted">loading…</p>`
        : projects.length === 0 ? html`<p class="muted">none yet</p>`
        : html`
          <ul>
            ${projects.map((p) => {
              const mine = all.filter((w) => w.project_id === p.id);
              const running = mine.filter((w) => w.state === 'running').length;
              return html`
                <li key=${p.id}>
                  <a href="#/p/${encodeURIComponent(p.name)}" data-testid="project-${p.name}"
                    aria-current=${p.name === current ? 'page' : undefined}>
                    <span class="pname">${p.name}</span>
                    <span class="pcount">${mine.length}${running ? ` · ${running} running` : ''}</span>
                  </a>
                </li>`;
            })}
          </ul>`}
    </nav>`;
}

function WorkspaceList({ list, transitions, synced }) {
  if (!synced) return html`<p class="muted">loading…</p>`;
  if (!list.length) return html`<p class="empty" data-testid="no-workspaces">No workspaces yet.</p>`;
  return html`
    <div class="ws-list">
      ${list.map((ws) => html`<${WorkspaceCard} key=${ws.id} ws=${ws} transition=${transitions[ws.id]} />`)}
    </div>`;
}

function ProjectPage({ name, s }) {
  const project = s.projects?.find((p) => p.name === name);
  if (!project) {
    return html`
      <div class="page">
        <h1 tabindex="-1">${name}</h1>
        <p class="muted">${s.projects === null ? 'loading…' : 'There is no project of that name.'}</p>
      </div>`;
  }
  const list = Object.values(s.workspaces).filter((w) => w.project_id === project.id).sort(byCreation);
  return html`
    <div class="page" data-testid="project-page-${name}">
      <div class="page-head">
        <h1 tabindex="-1">${name}</h1>
        <span class="muted">project ${project.id}</span>
      </div>
      <div class="project-grid">
        <section aria-label="Workspaces of ${name}" data-testid="workspaces">
          <${WorkspaceList} list=${list} transitions=${s.transitions} synced=${s.synced} />
        </section>
        <${CreateForm} key=${name} project=${name} images=${s.images} />
      </div>
    </div>`;
}

function HomePage({ s }) {
  const all = Object.values(s.workspaces).sort(byCreation);
  const projects = s.projects ?? [];
  return html`
    <div class="page">
      <div class="page-head"><h1 tabindex="-1">All workspaces</h1></div>
      ${s.projects !== null && projects.length === 0 && html`
        <p class="empty">No projects yet: <code>aether project create NAME</code> makes one.</p>`}
      ${projects.map((p) => html`
        <section class="group" key=${p.id} aria-labelledby="group-${p.id}">
          <h2 id="group-${p.id}"><a href="#/p/${encodeURIComponent(p.name)}">${p.name}</a></h2>
          <${WorkspaceList} list=${all.filter((w) => w.project_id === p.id)}
            transitions=${s.transitions} synced=${s.synced} />
        </section>`)}
    </div>`;
}

export function App() {
  const s = useStore();
  const route = useRoute();
  const main = useRef();
  const first = useRef(true);

  const title = route.view === 'project' ? route.name : route.view === 'workspace' ? route.id : null;
  useEffect(() => {
    document.title = title ? `${title} · aether` : 'aether';
    // After a navigation, the keyboard starts from the new view's heading.
    if (first.current) first.current = false;
    else main.current?.querySelector('h1')?.focus();
  }, [title]);

  let view;
  if (route.view === 'project') view = html`<${ProjectPage} name=${route.name} s=${s} />`;
  else if (route.view === 'workspace') {
    view = html`<${WorkspacePage} id=${route.id} ws=${s.workspaces[route.id]}
      transition=${s.transitions[route.id]} synced=${s.synced} />`;
  } else view = html`<${HomePage} s=${s} />`;

  const currentProject = route.view === 'project' ? route.name : s.workspaces[route.id]?.project_name;
  return html`
    <div class="app" data-testid="app">
      <${Header} session=${s.session} connection=${s.sessionEnded ? 'ended' : s.connection} />
      <${Banners} banners=${s.banners} sessionEnded=${s.sessionEnded} />
      <div class="body">
        <${ProjectNav} projects=${s.projects} workspaces=${s.workspaces} current=${currentProject} />
        <main ref=${main}>${view}</main>
      </div>
    </div>`;
}

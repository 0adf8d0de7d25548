// The page of `aether ui`: projects, their workspaces live from /api/events, and a workspace
// page with its details, terminal, console log and tasks. The API is ui/API.md.
//
// Stable data-testid attributes, for tests (ID is a workspace id, NAME a project name):
//   app                      the whole page, once rendered
//   user, connection         the login user in the header; "live", "reconnecting…" or
//                            "session ended"
//   banner, banner-dismiss   an error message (the daemon's words), its dismiss button; the
//                            "Session ended: ..." message after a 401 is a banner too
//   project-NAME             the project's link in the project list
//   project-page-NAME        the project view
//   workspaces, no-workspaces  the project's workspace list; the note when it is empty
//   workspace-ID             a workspace's card (also data-workspace-id=ID)
//   state-ID                 its state badge; the text is the state name (stopped, starting,
//                            running, stopping, error, stop_failed)
//   hardware-ID, address-ID, created-ID, idle-ID   its facts; idle-ID is the idle clock
//   start-ID, stop-ID, force-stop-ID, delete-ID    its buttons (force-stop only in stop_failed)
//   delete-dialog, delete-force, delete-confirm    the delete confirmation
//   indicator-ID             the status of its newest boot or stop (data-active=true while on)
//   indicator-state-ID, phase-ID, elapsed-ID       while on: state, phase, time since it began
//   steps-ID                 every state/phase the stream reported in that transition, each a
//   step-ID-SLUG             <li> with data-state and data-phase; SLUG is the phase, else the
//                            state, lower case with dashes ("waiting-for-ssh", "running")
//   indicator-dismiss-ID     hides a finished transition
//   error-ID, reason-ID, console-tail-ID           an error's reason and console tail
//   create-form, create-error, create-ok           the new-workspace form, the daemon's refusal,
//                                                  the id it created
//   preset-small|medium|large, create-image, create-cpus, create-memory, create-volume,
//   create-cpu-kind, create-idle-timeout, create-submit   the form's controls
//   workspace-page-ID, fields, field-KEY           the workspace page and its fields (KEY is
//                                                  the workspace object's field name)
//   console, console-refresh                       its console log
//   tasks, tasks-empty, tasks-refresh, task-TASKID, task-log-TASKID, task-log   its tasks
//   terminal-open, terminal-close, terminal-reconnect, terminal-status, terminal
//                            the terminal's controls, its state text and the xterm container

import { html } from 'htm/preact';
import { render } from 'preact';
import { App } from './app.js';
import { loadAll } from './store.js';
import './style.css';

loadAll();
render(html`<${App} />`, document.getElementById('app'));

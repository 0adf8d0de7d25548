// The form that creates a workspace in a project. It checks nothing itself: the daemon's
// answer, error text included, is what the user sees.

import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { createWorkspace } from './store.js';

const PRESETS = [
  { name: 'small', cpus: '1', memory_mb: '1024', volume_size_gb: '10' },
  { name: 'medium', cpus: '2', memory_mb: '2048', volume_size_gb: '20' },
  { name: 'large', cpus: '4', memory_mb: '8192', volume_size_gb: '40' },
];
const NUMBERS = ['cpus', 'memory_mb', 'volume_size_gb'];
const EMPTY = { image: '', cpus: '', memory_mb: '', volume_size_gb: '', cpu_kind: 'shared', idle_timeout: '' };

/** The request body: the project and every field the user filled in; the daemon fills the rest. */
function body(project, f) {
  const b = { project, cpu_kind: f.cpu_kind };
  if (f.image) b.image = f.image;
  for (const k of NUMBERS) if (f[k].trim() !== '') b[k] = Number(f[k]);
  if (f.idle_timeout.trim() !== '') b.idle_timeout = f.idle_timeout.trim();
  return b;
}

export function CreateForm({ project, images }) {
  const [f, setF] = useState(EMPTY);
  const [error, setError] = useState('');
  const [created, setCreated] = useState(null);
  const [busy, setBusy] = useState(false);
  const field = (k) => ({
    id: `create-${k}`,
    name: k,
    value: f[k],
    onInput: (e) => setF({ ...f, [k]: e.currentTarget.value }),
  });
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError('');
    setCreated(null);
    try {
      setCreated((await createWorkspace(body(project, f))).id);
    } catch (err) {
      setError(err.message);
    }
    setBusy(false);
  };
  return html`
    <form class="create" data-testid="create-form" novalidate onSubmit=${submit}
      aria-labelledby="create-title" aria-busy=${busy}>
      <h2 id="create-title">New workspace</h2>
      <div class="presets" role="group" aria-label="Hardware presets">
        ${PRESETS.map((p) => {
          const on = NUMBERS.every((k) => f[k] === p[k]);
          return html`
            <button type="button" class="preset" aria-pressed=${on} data-testid="preset-${p.name}"
              onClick=${() => setF({ ...f, cpus: p.cpus, memory_mb: p.memory_mb, volume_size_gb: p.volume_size_gb })}>
              <strong>${p.name}</strong>
              <span>${p.cpus} cpu, ${Number(p.memory_mb) / 1024} GiB</span>
              <span>${p.volume_size_gb} GiB disk</span>
            </button>`;
        })}
      </div>
      <div class="fields-grid">
        <label for="create-image">Image</label>
        <select ...${field('image')} data-testid="create-image">
          <option value="">default</option>
          ${images.map((i) => html`<option value=${i.id}>${i.id}</option>`)}
        </select>
        <label for="create-cpus">CPUs</label>
        <input type="number" min="1" max="8" step="1" placeholder="2" ...${field('cpus')}
          data-testid="create-cpus" />
        <label for="create-memory_mb">Memory (MiB)</label>
        <input type="number" min="256" max="16384" step="256" placeholder="2048"
          ...${field('memory_mb')} data-testid="create-memory" />
        <label for="create-volume_size_gb">Disk (GiB)</label>
        <input type="number" min="1" step="1" placeholder="20" ...${field('volume_size_gb')}
          data-testid="create-volume" />
        <label for="create-cpu_kind">CPU kind</label>
        <select ...${field('cpu_kind')} data-testid="create-cpu-kind">
          <option value="shared">shared</option>
          <option value="performance">performance</option>
        </select>
        <label for="create-idle_timeout">Idle timeout</label>
        <input type="text" placeholder="daemon default, e.g. 10m; 0 never" autocomplete="off"
          spellcheck="false" ...${field('idle_timeout')} data-testid="create-idle-timeout" />
      </div>
      <div class="form-foot">
        <button type="submit" class="primary" disabled=${busy} data-testid="create-submit">Create workspace</button>
        ${created && html`<span class="ok" role="status" data-testid="create-ok">Created <a href="#/w/${created}">${created}</a></span>`}
      </div>
      ${error && html`<p class="form-error" role="alert" data-testid="create-error">${error}</p>`}
    </form>`;
}

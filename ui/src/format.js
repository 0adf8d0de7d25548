// Text for people: dates, durations, hardware, the idle clock.

import { useEffect, useState } from 'preact/hooks';

/** Date.now(), refreshed every `ms` while the calling component is shown. */
export function useNow(ms = 1000) {
  const [now, setNow] = useState(Date.now);
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

const pad = (n) => String(n).padStart(2, '0');

/** Unix seconds as a local date, 2025-01-31. */
export function date(secs) {
  if (!secs) return '-';
  const d = new Date(secs * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

/** Unix seconds as a local date and time, 2025-01-31 14:05:09. */
export function dateTime(secs) {
  if (!secs) return '-';
  const d = new Date(secs * 1000);
  return `${date(secs)} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A duration in seconds as the CLI writes idle timeouts: 90s, 30m, 2h, 1h30m. */
export function duration(secs) {
  const h = Math.floor(secs / 3600);
  const m = Math.floor((secs % 3600) / 60);
  const s = secs % 60;
  return [h && `${h}h`, m && `${m}m`, s && `${s}s`].filter(Boolean).join('') || '0s';
}

/** Elapsed milliseconds for the status indicator: 40 ms, 2.4 s, 12 s, 2 min 05 s. */
export function elapsed(ms) {
  const s = Math.max(0, ms) / 1000;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.floor(s)} s`;
  return `${Math.floor(s / 60)} min ${pad(Math.floor(s % 60))} s`;
}

/** What `aether workspace list` shows as hardware: 2cpu/2048mb. */
export function hardwareShort(h) {
  return h ? `${h.cpus}cpu/${h.memory_mb}mb` : '-';
}

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

/** What `aether workspace get` shows as hardware. */
export function hardwareLong(h) {
  const parts = [plural(h.cpus, `${h.cpu_kind || 'shared'} cpu`),
    `${h.memory_mb} MiB memory`, `${h.volume_size_gb} GiB disk`];
  if (h.gpu_kind) parts.push(`gpu ${h.gpu_kind}`);
  return parts.join(', ');
}

/** The idle clock: when the workspace will stop for idleness, or why it will not. */
export function idleText(ws, now) {
  if (ws.idle_timeout_secs === 0) return 'never stops for idleness';
  if (ws.stops_at > 0) {
    const left = Math.ceil(ws.stops_at - now / 1000);
    if (left <= 0) return 'stops now';
    if (left < 120) return `stops in ${left} s`;
    const min = Math.ceil(left / 60);
    if (min < 60) return `stops in ${min} min`;
    return `stops in ${Math.floor(min / 60)} h ${min % 60} min`;
  }
  if (ws.state === 'running' && (ws.active_connections > 0 || ws.running_tasks > 0)) {
    const by = [];
    if (ws.active_connections > 0) by.push(plural(ws.active_connections, 'connection'));
    if (ws.running_tasks > 0) by.push(plural(ws.running_tasks, 'task'));
    return `kept awake by ${by.join(', ')}`;
  }
  return `stops after ${duration(ws.idle_timeout_secs)} idle`;
}

/** A phase or state as a data-testid part: "waiting for ssh" → "waiting-for-ssh". */
export function slug(s) {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
}

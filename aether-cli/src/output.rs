//! Rendering for people (aligned tables, key/value blocks) and for programs (`-o json`, with
//! the proto's field names).

use aether_domain::STATE_NAMES;
use aether_proto::v1 as pb;
use serde_json::{json, Value};

/// The proto's states, in the order of [`STATE_NAMES`] (the names the daemon uses).
const STATES: [pb::WorkspaceState; 6] = [
    pb::WorkspaceState::Stopped,
    pb::WorkspaceState::Starting,
    pb::WorkspaceState::Running,
    pb::WorkspaceState::Stopping,
    pb::WorkspaceState::Error,
    pb::WorkspaceState::StopFailed,
];

pub fn state_name(v: i32) -> &'static str {
    STATES
        .iter()
        .position(|s| *s as i32 == v)
        .map_or("unknown", |i| STATE_NAMES[i])
}

/// A state as users type it (`--status`), refused with the daemon's message.
pub fn state_from_name(s: &str) -> Result<pb::WorkspaceState, aether_domain::InvalidInput> {
    let name = aether_domain::parse_state_name(s)?;
    Ok(STATES[STATE_NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a state name")])
}

/// `2cpu/2048mb`, plus `/gpu:KIND` with a GPU.
pub fn hardware_short(h: Option<&pb::Hardware>) -> String {
    let Some(h) = h else { return "-".into() };
    let mut s = format!("{}cpu/{}mb", h.cpus, h.memory_mb);
    if !h.gpu_kind.is_empty() {
        s.push_str("/gpu:");
        s.push_str(&h.gpu_kind);
    }
    s
}

fn hardware_long(h: &pb::Hardware) -> String {
    let gpu = if h.gpu_kind.is_empty() {
        "none"
    } else {
        &h.gpu_kind
    };
    format!(
        "{} cpu(s) ({}), {} MiB memory, {} GiB volume, gpu {gpu}",
        h.cpus, h.cpu_kind, h.memory_mb, h.volume_size_gb
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD` (UTC).
pub fn date(unix: i64) -> String {
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn datetime(unix: i64) -> String {
    let secs = unix.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        date(unix),
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `90s`, `30m`, `2h`, `1h30m`.
pub fn duration(secs: u64) -> String {
    match (secs / 3600, (secs % 3600) / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, 0) if h > 0 => format!("{h}h{m}m"),
        _ => format!("{secs}s"),
    }
}

/// Left-aligned columns separated by two spaces; no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn workspace_table(list: &[pb::Workspace]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.project_name.clone(),
                if w.suspended {
                    "stopped (suspended)".to_owned()
                } else {
                    state_name(w.state).to_owned()
                },
                hardware_short(w.hardware.as_ref()),
                date(w.created_at),
            ]
        })
        .collect();
    table(&["ID", "PROJECT", "STATUS", "HARDWARE", "CREATED"], &rows)
}

pub fn project_table(list: &[pb::Project]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.name.clone(),
                p.workspace_count.to_string(),
                date(p.created_at),
            ]
        })
        .collect();
    table(&["ID", "NAME", "WORKSPACES", "CREATED"], &rows)
}

pub fn workspace_details(w: &pb::Workspace) -> String {
    let mut lines = vec![
        ("id", w.id.clone()),
        ("project", format!("{} ({})", w.project_name, w.project_id)),
        ("state", state_name(w.state).to_owned()),
    ];
    if !w.reason.is_empty() {
        lines.push(("reason", w.reason.clone()));
    }
    if w.suspended {
        lines.push((
            "suspended",
            format!(
                "yes: the next start resumes it ({} memory image)",
                size(w.memory_image_bytes)
            ),
        ));
    }
    if let Some(h) = &w.hardware {
        lines.push(("hardware", hardware_long(h)));
    }
    if !w.dedicated_cpus.is_empty() {
        lines.push(("dedicated cpus", cpu_list(&w.dedicated_cpus)));
    }
    if let Some(p) = &w.pending_hardware {
        lines.push((
            "pending",
            format!("{} (applied at next start)", hardware_long(p)),
        ));
    }
    let ips = if w.ip_addresses.is_empty() {
        "-".to_owned()
    } else {
        w.ip_addresses.join(", ")
    };
    lines.push(("ip addresses", ips));
    if !w.image.is_empty() {
        lines.push(("image", w.image.clone()));
    }
    if !w.login_user.is_empty() {
        lines.push(("login user", w.login_user.clone()));
    }
    if !w.phase.is_empty() {
        lines.push(("phase", w.phase.clone()));
    }
    lines.push((
        "idle timeout",
        if w.idle_timeout_secs == 0 {
            "never".to_owned()
        } else {
            duration(w.idle_timeout_secs)
        },
    ));
    lines.push(("connections", w.active_connections.to_string()));
    lines.push(("running tasks", w.running_tasks.to_string()));
    if w.idle_since > 0 {
        lines.push(("idle since", datetime(w.idle_since)));
    }
    if w.stops_at > 0 {
        lines.push(("stops at", datetime(w.stops_at)));
    }
    lines.push(("created", datetime(w.created_at)));
    lines.push(("domain", w.domain_name.clone()));
    key_values(&lines)
}

pub fn project_details(p: &pb::Project) -> String {
    key_values(&[
        ("id", p.id.clone()),
        ("name", p.name.clone()),
        ("workspaces", p.workspace_count.to_string()),
        ("owner uid", p.owner_uid.to_string()),
        ("created", datetime(p.created_at)),
    ])
}

/// `1,2` for a list of host CPUs.
fn cpu_list(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub fn host_details(h: &pb::HostInfo) -> String {
    let mut text = key_values(&[
        ("cpus", h.cpus.to_string()),
        (
            "shared cpus",
            if h.shared_cpus.is_empty() {
                "all (none dedicated)".to_owned()
            } else {
                cpu_list(&h.shared_cpus)
            },
        ),
        ("memory", format!("{} MiB", h.memory_mib)),
        ("aetherd", h.version.clone()),
        ("libvirt uri", h.libvirt_uri.clone()),
        ("libvirt", h.libvirt_version.clone()),
        ("hypervisor", h.hypervisor.clone()),
        ("accelerator", h.accelerator.clone()),
        ("max volume", format!("{} GiB", h.max_volume_size_gb)),
        (
            "gpus",
            if h.gpus.is_empty() {
                "none".to_owned()
            } else {
                h.gpus.len().to_string()
            },
        ),
    ]);
    if !h.gpus.is_empty() {
        let rows: Vec<Vec<String>> = h
            .gpus
            .iter()
            .map(|g| {
                vec![
                    g.kind.clone(),
                    g.address.clone(),
                    if g.iommu_group < 0 {
                        "-".into()
                    } else {
                        g.iommu_group.to_string()
                    },
                    if g.driver.is_empty() {
                        "-".into()
                    } else {
                        g.driver.clone()
                    },
                    if g.held_by.is_empty() {
                        "free".into()
                    } else {
                        g.held_by.clone()
                    },
                    g.name.clone(),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&table(
            &["KIND", "ADDRESS", "IOMMU", "DRIVER", "HELD BY", "NAME"],
            &rows,
        ));
    }
    text
}

fn key_values(lines: &[(&str, String)]) -> String {
    let w = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:")))
        .collect()
}

fn boot_mode_name(v: i32) -> &'static str {
    match pb::BootMode::try_from(v) {
        Ok(pb::BootMode::Bios) => "bios",
        Ok(pb::BootMode::Uefi) => "uefi",
        Ok(pb::BootMode::Kernel) => "kernel",
        Ok(pb::BootMode::Unspecified) | Err(_) => "unknown",
    }
}

/// Bytes as a short human size (GiB with one decimal, or MiB).
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{}MiB", bytes.div_ceil(1 << 20))
    }
}

pub fn image_table(list: &[pb::Image]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                image_owner(i.owner_uid),
                i.format.clone(),
                size(i.virtual_size_bytes),
                boot_mode_name(i.boot_mode).to_owned(),
                i.in_use.to_string(),
                date(i.created_at),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "OWNER", "FORMAT", "SIZE", "BOOT", "IN-USE", "CREATED",
        ],
        &rows,
    )
}

/// "shared" for root's images, else the owner's user name (or uid).
fn image_owner(uid: u32) -> String {
    if uid == 0 {
        return "shared".to_owned();
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

pub fn image_json(i: &pb::Image) -> Value {
    json!({
        "id": i.id,
        "name": i.name,
        "owner_uid": i.owner_uid,
        "format": i.format,
        "virtual_size_bytes": i.virtual_size_bytes,
        "disk_size_bytes": i.disk_size_bytes,
        "boot_mode": boot_mode_name(i.boot_mode),
        "cmdline": i.cmdline,
        "in_use": i.in_use,
        "created_at": i.created_at,
    })
}

// ---- JSON, with the proto's field names ----

fn hardware_json(h: &pb::Hardware) -> Value {
    json!({
        "cpu_kind": h.cpu_kind,
        "cpus": h.cpus,
        "memory_mb": h.memory_mb,
        "volume_size_gb": h.volume_size_gb,
        "gpu_kind": h.gpu_kind,
    })
}

pub fn workspace_json(w: &pb::Workspace) -> Value {
    json!({
        "id": w.id,
        "project_id": w.project_id,
        "project_name": w.project_name,
        "state": state_name(w.state),
        "hardware": w.hardware.as_ref().map(hardware_json),
        "pending_hardware": w.pending_hardware.as_ref().map(hardware_json),
        "ip_addresses": w.ip_addresses,
        "created_at": w.created_at,
        "reason": w.reason,
        "generation": w.generation,
        "domain_name": w.domain_name,
        "owner_uid": w.owner_uid,
        "image": w.image,
        "login_user": w.login_user,
        "ssh_host_public_key": w.ssh_host_public_key,
        "phase": w.phase,
        "idle_timeout_secs": w.idle_timeout_secs,
        "active_connections": w.active_connections,
        "running_tasks": w.running_tasks,
        "idle_since": w.idle_since,
        "stops_at": w.stops_at,
        "dedicated_cpus": w.dedicated_cpus,
        "suspended": w.suspended,
        "memory_image_bytes": w.memory_image_bytes,
    })
}

pub fn project_json(p: &pb::Project) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "owner_uid": p.owner_uid,
        "created_at": p.created_at,
        "workspace_count": p.workspace_count,
    })
}

pub fn host_json(h: &pb::HostInfo) -> Value {
    json!({
        "version": h.version,
        "libvirt_uri": h.libvirt_uri,
        "libvirt_version": h.libvirt_version,
        "hypervisor": h.hypervisor,
        "accelerator": h.accelerator,
        "max_volume_size_gb": h.max_volume_size_gb,
        "cpus": h.cpus,
        "shared_cpus": h.shared_cpus,
        "memory_mib": h.memory_mib,
        "gpus": h.gpus.iter().map(|g| json!({
            "kind": g.kind,
            "name": g.name,
            "address": g.address,
            "iommu_group": g.iommu_group,
            "driver": g.driver,
            "held_by": g.held_by,
        })).collect::<Vec<_>>(),
    })
}

/// `image catalog`: NAME BOOT MIN-DISK DESCRIPTION.
pub fn catalog_table(entries: &[pb::CatalogEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                boot_mode_name(e.boot_mode).to_owned(),
                format!("{} GiB", e.min_disk_gb),
                e.description.clone(),
            ]
        })
        .collect();
    table(&["NAME", "BOOT", "MIN-DISK", "DESCRIPTION"], &rows)
}

pub fn catalog_json(e: &pb::CatalogEntry) -> Value {
    json!({
        "name": e.name,
        "description": e.description,
        "url": e.url,
        "checksum_url": e.checksum_url,
        "checksum_algorithm": e.checksum_algorithm,
        "boot_mode": boot_mode_name(e.boot_mode),
        "login_user": e.login_user,
        "min_disk_gb": e.min_disk_gb,
    })
}

/// `workspace snapshot list`: NAME CREATED.
pub fn snapshot_table(list: &[pb::Snapshot]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| vec![s.name.clone(), datetime(s.created_at)])
        .collect();
    table(&["NAME", "CREATED"], &rows)
}

pub fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({ "name": s.name, "created_at": s.created_at })
}

#[cfg(test)]
mod tests {
    use aether_domain::STATE_NAMES;
    use aether_proto::v1 as pb;

    use super::{date, datetime, duration, state_from_name, state_name, table, STATES};

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_773_532_800), "2026-03-15");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(datetime(1_773_532_800 + 3661), "2026-03-15 01:01:01 UTC");
    }

    /// Each proto state has the daemon's name (`WORKSPACE_STATE_STOP_FAILED` is
    /// `stop_failed`), and the names parse back to it.
    #[test]
    fn state_names_are_the_daemons() {
        for (state, name) in STATES.into_iter().zip(STATE_NAMES) {
            assert_eq!(
                state.as_str_name(),
                format!("WORKSPACE_STATE_{}", name.to_ascii_uppercase())
            );
            assert_eq!(state_name(state as i32), name);
            assert_eq!(state_from_name(name).unwrap(), state);
        }
        assert_eq!(
            state_name(pb::WorkspaceState::Unspecified as i32),
            "unknown"
        );
        assert_eq!(state_name(99), "unknown");
        assert_eq!(
            state_from_name("paused").unwrap_err().to_string(),
            "invalid status \"paused\": expected one of stopped, starting, running, stopping, error, stop_failed"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration(90), "90s");
        assert_eq!(duration(1800), "30m");
        assert_eq!(duration(7200), "2h");
        assert_eq!(duration(5400), "1h30m");
        assert_eq!(duration(3601), "3601s");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["ID", "NAME"],
            &[
                vec!["a".into(), "x".into()],
                vec!["longer".into(), "y".into()],
            ],
        );
        assert_eq!(t, "ID      NAME\na       x\nlonger  y\n");
    }
}

//! Validated domain types, parsed once at the edge.
//!
//! Nothing unvalidated reaches libvirt XML, a file path or a child process: every id, name and
//! hardware value the daemon uses was built through one of the constructors here. Ids and
//! names are defined in `aether-domain`, which the CLI shares, and re-exported here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use aether_domain::{ProjectId, ProjectName, ProjectRef, TaskId, WorkspaceId};

/// Lowest and highest vCPU count a workspace may have.
pub const CPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=8;
/// Lowest and highest memory a workspace may have, in MiB.
pub const MEMORY_MB_RANGE: std::ops::RangeInclusive<u32> = 256..=16384;

/// How the vCPUs of a workspace are placed on host CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuKind {
    Shared,
    Performance,
}

impl CpuKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "shared" => Ok(Self::Shared),
            "performance" => Ok(Self::Performance),
            _ => Err(Error::invalid(format!(
                "invalid cpu kind {s:?}: expected shared or performance"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Performance => "performance",
        }
    }
}

/// Validated hardware of a workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu_kind: CpuKind,
    pub cpus: u32,
    pub memory_mb: u32,
    pub volume_size_gb: u32,
    pub gpu_kind: Option<String>,
}

/// Hardware as requested: every field optional, nothing validated yet.
#[derive(Clone, Debug, Default)]
pub struct HardwareRequest {
    pub cpu_kind: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub volume_size_gb: Option<u32>,
    /// `Some("")` removes the GPU.
    pub gpu_kind: Option<String>,
}

impl HardwareRequest {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.cpu_kind.is_none()
            && self.cpus.is_none()
            && self.memory_mb.is_none()
            && self.volume_size_gb.is_none()
            && self.gpu_kind.is_none()
    }
}

/// What the host offers, against which hardware is validated.
#[derive(Clone, Debug)]
pub struct HardwareLimits {
    pub max_volume_size_gb: u32,
    /// GPU kinds this host has.
    pub gpu_kinds: Vec<String>,
}

impl Hardware {
    pub const DEFAULT: Hardware = Hardware {
        cpu_kind: CpuKind::Shared,
        cpus: 2,
        memory_mb: 2048,
        volume_size_gb: 20,
        gpu_kind: None,
    };

    /// `self` with the requested fields replaced, validated as a whole.
    pub fn with(&self, req: &HardwareRequest, limits: &HardwareLimits) -> Result<Hardware> {
        let cpu_kind = match &req.cpu_kind {
            Some(s) => CpuKind::parse(s)?,
            None => self.cpu_kind,
        };
        let cpus = req.cpus.unwrap_or(self.cpus);
        if !CPUS_RANGE.contains(&cpus) {
            return Err(Error::invalid(format!(
                "cpus must be between {} and {} (got {cpus})",
                CPUS_RANGE.start(),
                CPUS_RANGE.end()
            )));
        }
        let memory_mb = req.memory_mb.unwrap_or(self.memory_mb);
        if !MEMORY_MB_RANGE.contains(&memory_mb) {
            return Err(Error::invalid(format!(
                "memory must be between {} and {} MiB (got {memory_mb})",
                MEMORY_MB_RANGE.start(),
                MEMORY_MB_RANGE.end()
            )));
        }
        let volume_size_gb = req.volume_size_gb.unwrap_or(self.volume_size_gb);
        if volume_size_gb < 1 || volume_size_gb > limits.max_volume_size_gb {
            return Err(Error::invalid(format!(
                "volume size must be between 1 and {} GiB (got {volume_size_gb})",
                limits.max_volume_size_gb
            )));
        }
        let gpu_kind = match req.gpu_kind.as_deref() {
            None => self.gpu_kind.clone(),
            Some("") => None,
            Some(kind) if limits.gpu_kinds.iter().any(|k| k == kind) => Some(kind.to_owned()),
            Some(kind) if limits.gpu_kinds.is_empty() => {
                return Err(Error::invalid(format!(
                    "unknown gpu kind {kind:?}: this host has no GPUs"
                )))
            }
            Some(kind) => {
                return Err(Error::invalid(format!(
                    "unknown gpu kind {kind:?}: this host has {}",
                    limits.gpu_kinds.join(", ")
                )))
            }
        };
        Ok(Hardware {
            cpu_kind,
            cpus,
            memory_mb,
            volume_size_gb,
            gpu_kind,
        })
    }

    /// An update of a workspace that already exists: like [`Hardware::with`], and the volume
    /// cannot shrink.
    pub fn updated(&self, req: &HardwareRequest, limits: &HardwareLimits) -> Result<Hardware> {
        let new = self.with(req, limits)?;
        if new.volume_size_gb < self.volume_size_gb {
            return Err(Error::invalid(format!(
                "volume size can only grow: it is {} GiB, requested {} GiB",
                self.volume_size_gb, new.volume_size_gb
            )));
        }
        Ok(new)
    }
}

impl fmt::Display for Hardware {
    /// `2cpu/2048mb`, plus `/gpu:KIND` with a GPU.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}cpu/{}mb", self.cpus, self.memory_mb)?;
        if let Some(gpu) = &self.gpu_kind {
            write!(f, "/gpu:{gpu}")?;
        }
        Ok(())
    }
}

/// Parses an idle timeout: `0` (never), `N` or `Ns` seconds, `Nm` minutes, `Nh` hours.
pub fn parse_duration_secs(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "invalid duration {s:?}: use a number with s, m or h, such as 90s, 30m, 2h (0 means never)"
        ))
    };
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c @ ('s' | 'm' | 'h'))) => (&s[..i], c),
        Some(_) => (s, 's'),
        None => return Err(bad()),
    };
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match unit {
        'h' => n * 3600,
        'm' => n * 60,
        _ => n,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_duration_secs, Hardware, HardwareLimits, HardwareRequest, WorkspaceId};
    use crate::error::Error;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("0").unwrap(), 0);
        assert_eq!(parse_duration_secs("90s").unwrap(), 90);
        assert_eq!(parse_duration_secs("30m").unwrap(), 1800);
        assert_eq!(parse_duration_secs("2h").unwrap(), 7200);
        assert_eq!(parse_duration_secs("45").unwrap(), 45);
        for bad in ["", "m", "-1m", "1.5h", "10d", "1 m", "9999999999s"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }

    fn limits() -> HardwareLimits {
        HardwareLimits {
            max_volume_size_gb: 100,
            gpu_kinds: vec![],
        }
    }

    #[test]
    fn hardware_ranges_are_enforced_with_specific_messages() {
        let d = Hardware::DEFAULT;
        let req = |f: fn(&mut HardwareRequest)| {
            let mut r = HardwareRequest::default();
            f(&mut r);
            r
        };
        let err = d.with(&req(|r| r.cpus = Some(9)), &limits()).unwrap_err();
        assert_eq!(err.to_string(), "cpus must be between 1 and 8 (got 9)");
        assert!(d.with(&req(|r| r.cpus = Some(0)), &limits()).is_err());
        assert!(d.with(&req(|r| r.cpus = Some(8)), &limits()).is_ok());
        let err = d
            .with(&req(|r| r.memory_mb = Some(255)), &limits())
            .unwrap_err();
        assert!(err.to_string().contains("between 256 and 16384"), "{err}");
        assert!(d
            .with(&req(|r| r.memory_mb = Some(16384)), &limits())
            .is_ok());
        let err = d
            .with(&req(|r| r.volume_size_gb = Some(101)), &limits())
            .unwrap_err();
        assert!(err.to_string().contains("between 1 and 100 GiB"), "{err}");
        let err = d
            .with(&req(|r| r.cpu_kind = Some("fast".into())), &limits())
            .unwrap_err();
        assert!(err.to_string().contains("shared or performance"), "{err}");
        let err = d
            .with(&req(|r| r.gpu_kind = Some("h100".into())), &limits())
            .unwrap_err();
        assert!(err.to_string().contains("no GPUs"), "{err}");
        let gpus = HardwareLimits {
            max_volume_size_gb: 100,
            gpu_kinds: vec!["nvidia-a".into()],
        };
        let hw = d
            .with(&req(|r| r.gpu_kind = Some("nvidia-a".into())), &gpus)
            .unwrap();
        assert_eq!(hw.to_string(), "2cpu/2048mb/gpu:nvidia-a");
        let err = d
            .with(&req(|r| r.gpu_kind = Some("x".into())), &gpus)
            .unwrap_err();
        assert!(err.to_string().contains("this host has nvidia-a"), "{err}");
    }

    #[test]
    fn volume_only_grows_on_update() {
        let d = Hardware::DEFAULT;
        let shrink = HardwareRequest {
            volume_size_gb: Some(10),
            ..Default::default()
        };
        let err = d.updated(&shrink, &limits()).unwrap_err();
        assert!(err.to_string().contains("can only grow"), "{err}");
        let grow = HardwareRequest {
            volume_size_gb: Some(30),
            ..Default::default()
        };
        assert_eq!(d.updated(&grow, &limits()).unwrap().volume_size_gb, 30);
    }

    /// The ids and names come from `aether-domain`; its errors become `InvalidArgument` with
    /// the message unchanged.
    #[test]
    fn shared_parsers_fail_as_invalid_arguments() {
        let e: Error = WorkspaceId::parse("../etc").unwrap_err().into();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m == "invalid workspace id \"../etc\": expected ws- followed by 6 lowercase letters or digits"),
            "{e:?}"
        );
        let e: Error = aether_domain::validate_login("root").unwrap_err().into();
        assert!(matches!(&e, Error::InvalidArgument(_)), "{e:?}");
    }

    /// `aether-domain`'s state names, which the CLI uses, are the state machine's, in its
    /// order, and refused with the same message.
    #[test]
    fn shared_state_names_are_the_state_machines() {
        use crate::workspace::state::{State, ALL_STATES};
        assert_eq!(ALL_STATES.map(State::as_str), aether_domain::STATE_NAMES);
        for name in aether_domain::STATE_NAMES {
            assert_eq!(
                State::parse(aether_domain::parse_state_name(name).unwrap())
                    .unwrap()
                    .as_str(),
                name
            );
        }
        for bad in ["paused", "", "Running"] {
            assert_eq!(
                State::parse(bad).unwrap_err().to_string(),
                aether_domain::parse_state_name(bad)
                    .unwrap_err()
                    .to_string()
            );
        }
    }
}

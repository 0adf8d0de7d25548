//! Ids and names, validated once at the edge: nothing unvalidated reaches libvirt XML, a file
//! path, a child process or an ssh command line.

use std::fmt;

use crate::{InvalidInput, Result};

/// A project id: 8 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProjectId(String);

/// A workspace id: `ws-` followed by 6 lowercase alphanumerics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkspaceId(String);

/// A task id: `task-` followed by 8 lowercase alphanumerics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskId(String);

/// A project name: `^[a-z0-9][a-z0-9-]{0,62}$`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProjectName(String);

#[cfg(feature = "generate")]
fn random_chars(alphabet: &[u8], n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    // 256 is not a multiple of 36, so the modulo is very slightly biased; ids only need to be
    // unlikely to collide (the store rejects a collision), not uniformly distributed.
    bytes
        .iter()
        .map(|b| alphabet[*b as usize % alphabet.len()] as char)
        .collect()
}

impl ProjectId {
    #[cfg(feature = "generate")]
    pub fn generate() -> Self {
        Self(random_chars(b"0123456789abcdef", 8))
    }

    pub fn parse(s: &str) -> Result<Self> {
        if s.len() == 8
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidInput::new(format!(
                "invalid project id {s:?}: expected 8 lowercase hex digits"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lowercase letters and digits: what follows the prefix of a workspace or task id.
#[cfg(feature = "generate")]
const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `s` if it is `prefix` followed by `n` lowercase letters or digits, else the refusal
/// naming `what`.
fn prefixed(s: &str, prefix: &str, n: usize, what: &str) -> Result<String> {
    let ok = s.len() == prefix.len() + n
        && s.starts_with(prefix)
        && s[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(InvalidInput::new(format!(
            "invalid {what} {s:?}: expected {prefix} followed by {n} lowercase letters or digits"
        )))
    }
}

impl WorkspaceId {
    #[cfg(feature = "generate")]
    pub fn generate() -> Self {
        Self(format!("ws-{}", random_chars(ID_CHARS, 6)))
    }

    pub fn parse(s: &str) -> Result<Self> {
        prefixed(s, "ws-", 6, "workspace id").map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The libvirt domain name of this workspace.
    pub fn domain_name(&self) -> String {
        format!("aether-{}", self.0)
    }

    /// The workspace a libvirt domain name ([`WorkspaceId::domain_name`]) is of, if any.
    pub fn from_domain_name(name: &str) -> Option<Self> {
        name.strip_prefix("aether-")
            .and_then(|id| Self::parse(id).ok())
    }
}

impl TaskId {
    #[cfg(feature = "generate")]
    pub fn generate() -> Self {
        Self(format!("task-{}", random_chars(ID_CHARS, 8)))
    }

    pub fn parse(s: &str) -> Result<Self> {
        prefixed(s, "task-", 8, "task id").map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ProjectName {
    pub fn parse(s: &str) -> Result<Self> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidInput::new(format!(
                "invalid project name {s:?}: use 1-63 lowercase letters, digits and '-', starting with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A reference to a project as users type it: its id or its name.
#[derive(Clone, Debug)]
pub enum ProjectRef {
    Id(ProjectId),
    Name(ProjectName),
}

impl ProjectRef {
    /// An 8-hex-digit string is taken as an id first; the store falls back to the name.
    pub fn parse(s: &str) -> Result<Self> {
        if let Ok(id) = ProjectId::parse(s) {
            return Ok(Self::Id(id));
        }
        ProjectName::parse(s).map(Self::Name).map_err(|_| {
            InvalidInput::new(format!("invalid project {s:?}: not a project id or name"))
        })
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
display_as_str!(ProjectId, WorkspaceId, TaskId, ProjectName);

#[cfg(test)]
mod tests {
    use super::{ProjectId, ProjectName, ProjectRef, TaskId, WorkspaceId};
    use crate::Result;

    #[cfg(feature = "generate")]
    #[test]
    fn generated_ids_round_trip() {
        for _ in 0..100 {
            let w = WorkspaceId::generate();
            assert_eq!(WorkspaceId::parse(w.as_str()).unwrap(), w);
            let p = ProjectId::generate();
            assert_eq!(ProjectId::parse(p.as_str()).unwrap(), p);
            let t = TaskId::generate();
            assert_eq!(TaskId::parse(t.as_str()).unwrap(), t);
        }
    }

    #[test]
    fn ids_reject_garbage() {
        for good in ["ws-abc123", "ws-000000", "ws-zzzzzz"] {
            assert_eq!(WorkspaceId::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "ws-",
            "ws-ABC123",
            "ws-abc12",
            "ws-abc1234",
            "xx-abc123",
            "ws-ab/123",
            "ws-abc12;",
        ] {
            assert!(WorkspaceId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ProjectId::parse("a1b2c3d4").unwrap().as_str(), "a1b2c3d4");
        for bad in ["", "A1B2C3D4", "a1b2c3d", "a1b2c3d4e", "g1b2c3d4"] {
            assert!(ProjectId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            TaskId::parse("task-ab12cd34").unwrap().as_str(),
            "task-ab12cd34"
        );
        for bad in [
            "",
            "task-",
            "task-AB12CD34",
            "task-ab12cd3",
            "task-ab12cd345",
            "ws-ab12cd34x",
            "task-ab/2cd34",
        ] {
            assert!(TaskId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn project_names() {
        for good in ["a", "my-app", "0x", &"a".repeat(63)] {
            assert!(ProjectName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "My-app",
            "a_b",
            "a b",
            "../x",
            &"a".repeat(64),
            "é",
            "*",
        ] {
            assert!(ProjectName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn project_refs_prefer_the_id() {
        assert!(matches!(
            ProjectRef::parse("deadbeef").unwrap(),
            ProjectRef::Id(id) if id.as_str() == "deadbeef"
        ));
        assert!(matches!(
            ProjectRef::parse("my-app").unwrap(),
            ProjectRef::Name(n) if n.as_str() == "my-app"
        ));
        assert!(ProjectRef::parse("Bad_Name").is_err());
    }

    /// The daemon's messages, which the CLI now prints too (integration tests compare them).
    #[test]
    fn messages() {
        let msg = |r: Result<()>| r.unwrap_err().into_message();
        assert_eq!(
            msg(WorkspaceId::parse("../etc").map(drop)),
            "invalid workspace id \"../etc\": expected ws- followed by 6 lowercase letters or digits"
        );
        assert_eq!(
            msg(ProjectId::parse("xyz").map(drop)),
            "invalid project id \"xyz\": expected 8 lowercase hex digits"
        );
        assert_eq!(
            msg(ProjectName::parse("a_b").map(drop)),
            "invalid project name \"a_b\": use 1-63 lowercase letters, digits and '-', starting with a letter or digit"
        );
        assert_eq!(
            msg(ProjectRef::parse("Bad_Name").map(drop)),
            "invalid project \"Bad_Name\": not a project id or name"
        );
    }

    #[test]
    fn display_and_libvirt_name() {
        let w = WorkspaceId::parse("ws-abc123").unwrap();
        assert_eq!(w.to_string(), "ws-abc123");
        assert_eq!(w.domain_name(), "aether-ws-abc123");
        assert_eq!(WorkspaceId::from_domain_name(&w.domain_name()), Some(w));
        for other in ["ws-abc123", "aether-ws-ABC123", "aether-", "test"] {
            assert_eq!(WorkspaceId::from_domain_name(other), None, "{other}");
        }
        assert_eq!(ProjectName::parse("app").unwrap().to_string(), "app");
        assert_eq!(
            ProjectId::parse("a1b2c3d4").unwrap().to_string(),
            "a1b2c3d4"
        );
    }
}

//! The guest's login user.

use crate::{InvalidInput, Result};

/// A portable Linux login name, `^[a-z_][a-z0-9_-]{0,31}$`, and not `root` (the guest's root
/// account is left alone).
pub fn validate_login(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
        && name != "root";
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(format!(
            "invalid login user {name:?}: use 1-32 lowercase letters, digits, '_' and '-', starting with a letter or '_' (not root)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_login;

    #[test]
    fn login_names() {
        for good in ["alice", "_svc", "dev-1", "aether", &"a".repeat(32)] {
            assert!(validate_login(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "root",
            "Alice",
            "1abc",
            "a b",
            "a:b",
            "-oProxyCommand=x",
            &"a".repeat(33),
        ] {
            assert!(validate_login(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_login("root").unwrap_err().message(),
            "invalid login user \"root\": use 1-32 lowercase letters, digits, '_' and '-', starting with a letter or '_' (not root)"
        );
    }
}

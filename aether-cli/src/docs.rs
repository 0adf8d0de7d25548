//! What the CLI says about itself without a daemon: shell completion scripts (clap_complete)
//! and man pages (clap_mangen), both generated from the same clap definitions as `--help`,
//! so they cannot drift from it.

use std::path::Path;

use anyhow::Context;

/// Writes the completion script for `shell` to stdout.
pub fn completions(cmd: &mut clap::Command, shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, "aether", &mut out);
    crate::emit(&String::from_utf8_lossy(&out))
}

/// Writes `aether.1` and one page per subcommand (`aether-workspace-create.1`, …) into
/// `dir`, creating it; returns how many pages it wrote.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = 0;
    write_pages(cmd.name("aether"), "aether", dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut usize,
) -> anyhow::Result<()> {
    let cmd = cmd.name(name.to_owned()).bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(sub.clone(), &sub_name, dir, written)?;
    }
    Ok(())
}

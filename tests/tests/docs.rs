//! What the CLI says about itself without a daemon: completion scripts that real shells load
//! and complete with, and man pages generated from the same definitions as `--help`.

use std::io::Write;
use std::process::{Command, Stdio};

use aether_tests::bin_dir;

fn aether(args: &[&str]) -> std::process::Output {
    let out = Command::new(bin_dir().join("aether"))
        .args(args)
        .env("AETHER_SOCKET", "/nonexistent/aetherd.sock")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    out
}

/// Runs `script` in a real bash with the completion script loaded; returns its stdout.
fn bash_with_completions(script: &str) -> String {
    let completions = aether(&["completions", "bash"]).stdout;
    let mut bash = Command::new("bash")
        .args(["--norc", "--noprofile", "-c"])
        .arg(format!("source /dev/stdin; {script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    bash.stdin.take().unwrap().write_all(&completions).unwrap();
    let out = bash.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bash_completes_subcommands_and_options() {
    let registered = bash_with_completions("complete -p aether");
    assert!(registered.contains("_aether"), "{registered}");
    // What bash offers after `aether wor<TAB>` and `aether workspace create --me<TAB>` (bash
    // calls the function with the command, the word and the word before it).
    let complete = |words: &str, cword: usize| {
        bash_with_completions(&format!(
            "COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _aether aether \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        ))
    };
    let first = complete("aether wor", 1);
    assert_eq!(first.lines().collect::<Vec<_>>(), ["workspace"], "{first}");
    let option = complete("aether workspace create --me", 3);
    assert_eq!(option.lines().collect::<Vec<_>>(), ["--memory"], "{option}");
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let script = String::from_utf8(aether(&["completions", shell]).stdout).unwrap();
        for sub in ["workspace", "port-forward", "ssh-config", "idle-timeout"] {
            assert!(script.contains(sub), "{shell} lacks {sub}");
        }
    }
    let out = Command::new(bin_dir().join("aether"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn man_pages_cover_every_subcommand_with_its_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = aether(&["man", "--dir", dir.path().to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert!(
        said.contains(&format!("wrote {} man pages", pages.len())),
        "{said}"
    );
    for page in [
        "aether.1",
        "aether-workspace.1",
        "aether-workspace-create.1",
        "aether-task-logs.1",
    ] {
        assert!(
            pages.iter().any(|p| p == page),
            "{page} missing from {pages:?}"
        );
    }
    let create = std::fs::read_to_string(dir.path().join("aether-workspace-create.1")).unwrap();
    assert!(create.contains(".TH aether-workspace-create 1"), "{create}");
    // The same words as --help.
    let help = String::from_utf8(aether(&["workspace", "create", "--help"]).stdout).unwrap();
    assert!(help.contains("Number of vCPUs, 1-8"), "{help}");
    assert!(create.contains(r"Number of vCPUs, 1\-8"), "{create}");
    assert!(create.contains(r"\-\-idle\-timeout"), "{create}");
}

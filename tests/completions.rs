//! `imattr completions SHELL` and `imattr man` print scripts naming the commands,
//! without needing a configuration.

use std::process::Command;

/// Runs `imattr ARGS…` with a configuration file that does not exist: these
/// commands must not read it.
fn imattr(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_imattr"))
        .args(args)
        .env("IMATTR_CONFIG", "/nonexistent/imattr.toml")
        .output()
        .expect("running imattr");
    assert!(
        out.status.success(),
        "imattr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn completions_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = imattr(&["completions", shell]);
        assert!(script.contains("imattr"), "{shell}: {script}");
        for word in ["dlq", "replay", "publish", "completions"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
}

#[test]
fn man_page_is_roff_naming_the_commands() {
    let page = imattr(&["man"]);
    assert!(page.contains(".TH imattr"), "{page}");
    for word in ["dlq", "publish", "completions"] {
        assert!(page.contains(word), "man page lacks {word}");
    }
}

#[test]
fn unknown_shell_is_bad_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_imattr"))
        .args(["completions", "tcsh"])
        .output()
        .expect("running imattr");
    assert_eq!(out.status.code(), Some(2));
}

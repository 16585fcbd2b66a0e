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
    assert!(page.starts_with(".TH IMATTR 1 "), "{page}");
    for word in ["dlq", "publish", "completions"] {
        assert!(page.contains(word), "man page lacks {word}");
    }
}

/// One page, self-contained: every command with its options, and the
/// sections a man page has; it refers to no page `imattr man` does not print.
#[test]
fn man_page_documents_every_command_exit_status_environment_and_files() {
    let page = imattr(&["man"]);
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH COMMANDS",
        ".SH EXIT STATUS",
        ".SH ENVIRONMENT",
        ".SH FILES",
    ] {
        assert!(page.contains(section), "no {section}");
    }
    for command in [
        "imattr run",
        "imattr publish",
        "imattr dlq list",
        "imattr dlq stats",
        "imattr dlq replay",
        "imattr dlq export",
        "imattr dlq purge",
        "imattr dlq migrate",
        "imattr get",
        "imattr sig",
        "imattr config",
        "imattr declare",
        "imattr simulate",
        "imattr console",
        "imattr demo",
        "imattr bench",
        "imattr completions",
        "imattr man",
    ] {
        assert!(
            page.contains(&format!(".SS \"{command}\"")),
            "no section for {command}"
        );
    }
    assert!(
        !page.contains("bench\\-consumer"),
        "a hidden command is shown"
    );
    for option in [
        "\\-\\-dry\\-run",
        "\\-\\-yes",
        "\\-\\-attr\\-names",
        "\\-\\-check",
    ] {
        assert!(page.contains(option), "no {option}");
    }
    for var in [
        "IMATTR_CONFIG",
        "RUST_LOG",
        "NO_COLOR",
        "TOKIO_WORKER_THREADS",
    ] {
        assert!(page.contains(var), "ENVIRONMENT lacks {var}");
    }
    // `imattr-run(1)` and the like: pages that do not exist.
    let dangling: Vec<&str> = page
        .lines()
        .filter(|l| l.contains("imattr\\-") && l.contains("(1)"))
        .collect();
    assert!(dangling.is_empty(), "refers to other pages: {dangling:?}");
    // man renders it without a warning, when it is installed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imattr.1");
    std::fs::write(&file, &page).unwrap();
    if let Ok(out) = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&file)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{warnings}");
        assert!(warnings.trim().is_empty(), "man warns: {warnings}");
        assert!(text.contains("EXIT STATUS"), "{text}");
    }
}

/// `simulate --help` says where its credentials come from and what happens
/// without --attr-names.
#[test]
fn simulate_help_says_what_a_user_needs() {
    let help = imattr(&["simulate", "--help"]);
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for needed in [
        "tencent.sdkappid",
        "tencent.secret_key",
        "with ErrorCode 90033: without --attr-names, every update is rejected",
    ] {
        assert!(
            help.contains(needed),
            "simulate --help lacks {needed}:\n{help}"
        );
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

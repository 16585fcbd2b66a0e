//! `imattr man`: one self-contained page, imattr(1), with every command and
//! its options, the exit statuses, the environment and the files (so that
//! nothing it mentions is a page that does not exist).

use std::io::Write;

use clap::{Arg, Command};

/// Writes the page for `cli` (the whole command line) as roff.
pub(crate) fn render(mut cli: Command, out: &mut impl Write) -> std::io::Result<()> {
    cli.build();
    let version = cli.get_version().unwrap_or_default().to_string();
    let mut page = String::new();
    page.push_str(&format!(
        ".TH IMATTR 1 \"\" \"imattr {version}\" \"User Commands\"\n"
    ));
    page.push_str(
        ".SH NAME\nimattr \\- keep Tencent Cloud Chat (IM) user attributes in sync from RabbitMQ events\n",
    );
    page.push_str(".SH SYNOPSIS\n\\fBimattr\\fR [\\fB\\-\\-config\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]\n");
    page.push_str(".SH DESCRIPTION\n");
    let about = cli
        .get_long_about()
        .or(cli.get_about())
        .map(|a| a.to_string())
        .unwrap_or_default();
    page.push_str(&paragraphs(&about));
    page.push_str(".SH OPTIONS\n");
    for arg in cli.get_arguments().filter(|a| !a.is_hide_set()) {
        option(&mut page, arg);
    }
    page.push_str(".SH COMMANDS\n");
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        command(&mut page, "imattr", sub);
    }
    page.push_str(STATIC_SECTIONS);
    out.write_all(page.as_bytes())
}

/// One command (and, under it, its own subcommands).
fn command(page: &mut String, parent: &str, cmd: &Command) {
    let path = format!("{parent} {}", cmd.get_name());
    let subs: Vec<&Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    if !subs.is_empty() {
        for sub in subs {
            command(page, &path, sub);
        }
        return;
    }
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set() && !is_builtin(a))
        .collect();
    let mut synopsis = format!("\\fB{}\\fR", text(&path));
    for a in &args {
        synopsis.push(' ');
        synopsis.push_str(&usage(a));
    }
    page.push_str(&format!(".SS \"{}\"\n", text(&path)));
    page.push_str(&format!("{synopsis}\n.PP\n"));
    page.push_str(&paragraphs(&first_line(cmd)));
    for a in args {
        option(page, a);
    }
    if let Some(after) = cmd.get_after_help() {
        page.push_str(".PP\n.nf\n");
        for line in after.to_string().lines() {
            page.push_str(&literal(line));
            page.push('\n');
        }
        page.push_str(".fi\n");
    }
}

fn is_builtin(a: &Arg) -> bool {
    matches!(a.get_id().as_str(), "help" | "version")
}

fn first_line(cmd: &Command) -> String {
    cmd.get_about().map(|a| a.to_string()).unwrap_or_default()
}

/// How an argument is written in a synopsis.
fn usage(a: &Arg) -> String {
    let values = value_names(a);
    let core = match a.get_long() {
        Some(long) => {
            let mut s = format!("\\fB\\-\\-{}\\fR", text(long));
            if !values.is_empty() {
                s.push_str(&format!(" \\fI{}\\fR", text(&values)));
            }
            s
        }
        None => format!("\\fI{}\\fR", text(&values)),
    };
    let repeated = matches!(a.get_action(), clap::ArgAction::Append);
    let core = if repeated {
        format!("{core}\\&...")
    } else {
        core
    };
    if a.is_required_set() {
        core
    } else {
        format!("[{core}]")
    }
}

fn value_names(a: &Arg) -> String {
    if !a.get_action().takes_values() {
        return String::new();
    }
    match a.get_value_names() {
        Some(names) => names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        None => a.get_id().as_str().to_uppercase(),
    }
}

/// An option as a tagged paragraph: its form, then its help, its values and default.
fn option(page: &mut String, a: &Arg) {
    page.push_str(".TP\n");
    let mut head = Vec::new();
    if let Some(short) = a.get_short() {
        head.push(format!("\\fB\\-{short}\\fR"));
    }
    if let Some(long) = a.get_long() {
        head.push(format!("\\fB\\-\\-{}\\fR", text(long)));
    }
    let values = value_names(a);
    let mut line = head.join(", ");
    if line.is_empty() {
        line = format!("\\fI{}\\fR", text(&values));
    } else if !values.is_empty() {
        line.push_str(&format!(" \\fI{}\\fR", text(&values)));
    }
    page.push_str(&line);
    page.push('\n');
    let mut help = a
        .get_long_help()
        .or(a.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let possible: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
    if !possible.is_empty() && a.get_action().takes_values() {
        help.push_str(&format!(" One of: {}.", possible.join(", ")));
    }
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() && a.get_action().takes_values() {
        help.push_str(&format!(" Default: {}.", defaults.join(",")));
    }
    page.push_str(&text(help.trim()));
    page.push('\n');
}

/// Text for a roff line: backslashes and a leading dot or quote escaped.
fn text(s: &str) -> String {
    let escaped = s.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// A line of a `.nf` block, as it is.
fn literal(s: &str) -> String {
    text(s)
}

/// Blank-line separated paragraphs.
fn paragraphs(s: &str) -> String {
    let mut out = String::new();
    for (i, p) in s.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str(".PP\n");
        }
        let joined: Vec<&str> = p.lines().map(str::trim).collect();
        out.push_str(&text(&joined.join(" ")));
        out.push('\n');
    }
    out
}

const STATIC_SECTIONS: &str = r#".SH EXIT STATUS
.TP
\fB0\fR
Success; for \fBimattr run\fR, a clean stop after SIGTERM or SIGINT. Also when the reader of standard output went away (\fBimattr dlq list | head\fR).
.TP
\fB1\fR
Failure at run time: the broker or the API could not be reached or refused, invalid lines in a \fB\-\-file\fR, an interrupted command.
.TP
\fB2\fR
Bad usage (an unknown command or option, a missing argument, an update on the command line that breaks a rule, \fBdlq purge\fR without \fB\-\-yes\fR) or bad configuration (an unknown key, a value out of range, missing API credentials, a queue that exists with other arguments); the message names the problem. Restarting does not help: change the command or the configuration.
.SH ENVIRONMENT
.TP
\fBIMATTR_CONFIG\fR
The configuration file, when \fB\-\-config\fR is not given.
.TP
\fBIMATTR_\fR\fISECTION\fR\fB__\fR\fIKEY\fR
Sets the configuration key \fIsection.key\fR, over the file; for example \fBIMATTR_TENCENT__SECRET_KEY\fR, \fBIMATTR_AMQP__URL\fR, \fBIMATTR_BATCH__MAX_WAIT_MS=100\fR, \fBIMATTR_ATTRIBUTES__ALLOWED='[sex,city]'\fR. \fBIMATTR_TENCENT__SECRET_KEY\fR, \fBIMATTR_TENCENT__USERSIG\fR and \fBIMATTR_AMQP__URL\fR are taken byte for byte, never parsed.
.TP
\fBRUST_LOG\fR
A tracing filter that overrides \fBlog.level\fR.
.TP
\fBNO_COLOR\fR
When set and not empty, text logs carry no colour; they carry none either when standard error is not a terminal.
.TP
\fBTOKIO_WORKER_THREADS\fR
Async worker threads (default 2, or 1 on a single core).
.SH FILES
.TP
\fB./config/imattr.toml\fR
Read when neither \fB\-\-config\fR nor \fBIMATTR_CONFIG\fR names a file. The repository's copy lists every key at its default.
.TP
\fB/etc/imattr/imattr.toml\fR, \fB/etc/imattr/imattr.env\fR
Where the systemd unit and the Docker image look for the configuration and the secrets.
.SH SEE ALSO
The repository's README.md and docs/: configuration.md (every key), messages.md (for publishers), dead\-letters.md, metrics.md, operations.md, several\-workers.md, operations\-tls.md.
"#;

//! How both daemons log: to stderr, one event per line, filtered by the built-in directives
//! extended (not replaced) by `RUST_LOG`, in colour only on a terminal.
//!
//! - **Filters add up.** A daemon's built-in filter (`"info,rumqttd=off"`: the embedded broker
//!   logs every ordinary client disconnect as an error) comes first and `RUST_LOG`'s directives
//!   after it, so `RUST_LOG=info` (what the systemd units set) keeps `rumqttd=off`, while
//!   `RUST_LOG=rumqttd=info` overrides that one directive (the later directive for the same
//!   target wins). An unparsable `RUST_LOG` is reported once and the built-in filter is used.
//! - **No escape codes in files or the journal.** Colour only when stderr is a terminal, not
//!   under the journal (`JOURNAL_STREAM`, set by systemd), and never with `NO_COLOR` set.
//! - **Error chains once.** [`error_chain`] prints an error and its causes on one line, leaving
//!   out a cause whose text the line already shows (a `thiserror` message that embeds
//!   `{source}` would otherwise print it twice).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter directives in force: `builtin`, then `rust_log`'s (if any).
pub fn filter_directives(builtin: &str, rust_log: Option<&str>) -> String {
    match rust_log.map(str::trim) {
        Some(extra) if !extra.is_empty() => {
            if builtin.is_empty() {
                extra.to_owned()
            } else {
                format!("{builtin},{extra}")
            }
        }
        _ => builtin.to_owned(),
    }
}

/// The filter for `builtin` extended by `rust_log`; on a bad `rust_log`, `builtin` alone and
/// the reason.
pub fn build_filter(builtin: &str, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let wanted = filter_directives(builtin, rust_log);
    match EnvFilter::builder().parse(&wanted) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::builder().parse_lossy(builtin),
            Some(format!(
                "RUST_LOG={:?} is not a valid filter ({e}); logging with {builtin:?}",
                rust_log.unwrap_or_default()
            )),
        ),
    }
}

/// Whether to colour the output. Pure: the caller says what stderr and the environment are.
pub fn use_colour(stderr_is_terminal: bool, under_journal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !under_journal && !no_color
}

/// Logs to stderr, filtered by `builtin` (e.g. `"info,rumqttd=off"`) extended by `RUST_LOG`.
pub fn init_logging(builtin: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, problem) = build_filter(builtin, rust_log.as_deref());
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("JOURNAL_STREAM").is_some(),
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    if let Some(p) = problem {
        tracing::warn!("{p}");
    }
}

/// An error and its causes on one line (`a: b: c`), each cause only if its text is not already
/// on the line; newlines become spaces.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// What a subscriber built as `init_logging` builds it writes for a few events.
    fn logged(builtin: &str, rust_log: Option<&str>, colour: bool) -> String {
        let buf = Buf::default();
        let (filter, _) = build_filter(builtin, rust_log);
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour)
            .with_writer(buf.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::error!(target: "rumqttd::router", "router-drop");
            tracing::info!(target: "edge_agent::link", "agent info line");
            tracing::debug!(target: "edge_agent::link", "agent debug line");
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rust_log_extends_the_builtin_filter() {
        // The unit's RUST_LOG=info keeps the broker's noise off.
        let out = logged("info,rumqttd=off", Some("info"), false);
        assert!(!out.contains("router-drop"), "{out}");
        assert!(out.contains("agent info line"));
        // Raising the level everywhere still keeps the built-in per-target directive.
        let out = logged("info,rumqttd=off", Some("debug"), false);
        assert!(!out.contains("router-drop"), "{out}");
        assert!(out.contains("agent debug line"));
        // Naming the target overrides it.
        let out = logged("info,rumqttd=off", Some("rumqttd=error"), false);
        assert!(out.contains("router-drop"), "{out}");
        // No RUST_LOG, or an empty one: the built-in filter.
        for r in [None, Some(""), Some("  ")] {
            let out = logged("info,rumqttd=off", r, false);
            assert!(!out.contains("router-drop") && !out.contains("debug line"));
        }
    }

    #[test]
    fn a_bad_rust_log_falls_back_to_the_builtin_filter_and_says_why() {
        let (_, problem) = build_filter("info,rumqttd=off", Some("info,[[[="));
        let p = problem.expect("reported");
        assert!(
            p.contains("not a valid filter") && p.contains("info,rumqttd=off"),
            "{p}"
        );
        let out = logged("info,rumqttd=off", Some("info,[[[="), false);
        assert!(out.contains("agent info line") && !out.contains("router-drop"));
        assert!(build_filter("info", Some("warn")).1.is_none());
    }

    #[test]
    fn colour_only_on_a_terminal_outside_the_journal() {
        assert!(use_colour(true, false, false));
        assert!(!use_colour(false, false, false));
        assert!(!use_colour(true, true, false));
        assert!(!use_colour(true, false, true));
        assert!(!logged("info", None, false).contains('\u{1b}'));
        assert!(logged("info", None, true).contains('\u{1b}'));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read /etc/tierd/agent.toml: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_shows_each_cause_once() {
        let e = Outer {
            source: std::io::Error::from_raw_os_error(2),
        };
        let line = error_chain(&e);
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        let wrapped = anyhow::Error::new(e).context("loading the config");
        let line = error_chain(wrapped.as_ref());
        assert!(
            line.starts_with("loading the config: cannot read"),
            "{line}"
        );
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        let plain = std::io::Error::other("line one\nline two");
        assert_eq!(error_chain(&plain), "line one line two");
    }
}

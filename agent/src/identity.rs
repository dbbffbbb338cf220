//! Who this agent is on the wire: its `device_id`, and which machine it runs on.
//!
//! - **`device_id`**: `agent.toml`'s `device_id`, else `$TIERD_DEVICE_ID`, else the hostname
//!   (reduced to `[A-Za-z0-9_.-]`, at most 64 bytes), else `edge-01`. Boards cloned from one SD
//!   image then differ as soon as their hostnames do, and a fleet image can set the id per board
//!   from its provisioning (an environment file) without editing the config.
//! - **Machine tag**: the first 16 hex digits of SHA-256 over a tierd-specific prefix and
//!   `/etc/machine-id` (the way systemd's `sd_id128_get_machine_app_specific` keeps the id itself
//!   private). The status message carries it, so the relay can warn when two machines claim one
//!   `device_id` at the same time (cloned images whose hostnames were not changed either).
//!   `$TIERD_MACHINE_ID_FILE` names another file to read the machine id from.
//!
//! The choices are pure functions of their inputs ([`resolve`], [`machine_tag`]); only
//! [`from_environment`] and [`read_machine_tag`] read the process environment and files.

use sha2::{Digest, Sha256};
use tierd_protocol::topic::MAX_DEVICE_ID_LEN;

/// The id used when neither the config, the environment nor the hostname gives one.
pub const FALLBACK_DEVICE_ID: &str = "edge-01";

/// The environment variable that names the device when `agent.toml` does not.
pub const DEVICE_ID_ENV: &str = "TIERD_DEVICE_ID";

/// Where the `device_id` in force came from (logged at start; `doctor` prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdSource {
    #[default]
    Config,
    Environment,
    Hostname,
    Fallback,
}

impl IdSource {
    pub fn describe(self) -> &'static str {
        match self {
            IdSource::Config => "agent.toml",
            IdSource::Environment => "$TIERD_DEVICE_ID",
            IdSource::Hostname => "the hostname",
            IdSource::Fallback => "the built-in default (no hostname)",
        }
    }
}

/// The device id when the config names none: `env` if set and non-empty (validated later, like
/// a configured one, so a bad value is an error that names it), else the hostname made valid,
/// else [`FALLBACK_DEVICE_ID`].
pub fn resolve(env: Option<&str>, hostname: Option<&str>) -> (String, IdSource) {
    if let Some(e) = env.map(str::trim).filter(|e| !e.is_empty()) {
        return (e.to_owned(), IdSource::Environment);
    }
    match hostname.map(device_id_from_hostname) {
        Some(h) if !h.is_empty() => (h, IdSource::Hostname),
        _ => (FALLBACK_DEVICE_ID.to_owned(), IdSource::Fallback),
    }
}

/// A hostname as a device id: characters outside `[A-Za-z0-9_.-]` become `-`, leading and
/// trailing dots and dashes go, at most [`MAX_DEVICE_ID_LEN`] bytes.
pub fn device_id_from_hostname(host: &str) -> String {
    let mapped: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(|c| c == '.' || c == '-');
    let mut id: String = trimmed.chars().take(MAX_DEVICE_ID_LEN).collect();
    while id.ends_with(['.', '-']) {
        id.pop();
    }
    id
}

/// The device id from this process's environment and hostname (see [`resolve`]).
pub fn from_environment() -> (String, IdSource) {
    let env = std::env::var(DEVICE_ID_ENV).ok();
    resolve(env.as_deref(), hostname().as_deref())
}

/// The kernel's hostname (`/proc/sys/kernel/hostname`, else `/etc/hostname`).
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
}

/// The machine tag for a machine id (see the module header). Pure.
pub fn machine_tag(machine_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tierd machine tag v1\0");
    h.update(machine_id.trim().as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Names a file to read the machine id from instead of `/etc/machine-id` (containers sharing
/// the host's id, several agents on one test host).
pub const MACHINE_ID_FILE_ENV: &str = "TIERD_MACHINE_ID_FILE";

/// This machine's tag, or `None` where no machine id exists (some containers).
pub fn read_machine_tag() -> Option<String> {
    let chosen = std::env::var_os(MACHINE_ID_FILE_ENV).map(std::path::PathBuf::from);
    let defaults = [
        std::path::PathBuf::from("/etc/machine-id"),
        std::path::PathBuf::from("/var/lib/dbus/machine-id"),
    ];
    let paths: Vec<std::path::PathBuf> = match chosen {
        Some(p) => vec![p],
        None => defaults.to_vec(),
    };
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty() && s != "uninitialized")
        .map(|id| machine_tag(&id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_then_the_hostname_then_the_fallback() {
        assert_eq!(
            resolve(Some("pi-07"), Some("raspberrypi")),
            ("pi-07".into(), IdSource::Environment)
        );
        assert_eq!(
            resolve(Some("  "), Some("raspberrypi")),
            ("raspberrypi".into(), IdSource::Hostname)
        );
        assert_eq!(resolve(None, Some("jetson-3")).1, IdSource::Hostname);
        assert_eq!(
            resolve(None, None),
            (FALLBACK_DEVICE_ID.into(), IdSource::Fallback)
        );
        assert_eq!(resolve(None, Some("...")).1, IdSource::Fallback);
        // A bad environment value is kept, so validation names it instead of hiding it.
        assert_eq!(resolve(Some("a/b"), None).0, "a/b");
    }

    #[test]
    fn hostnames_become_valid_device_ids() {
        assert_eq!(
            device_id_from_hostname("pi-07.field.lan\n"),
            "pi-07.field.lan"
        );
        assert_eq!(device_id_from_hostname("Kamera Süd"), "Kamera-S-d");
        assert_eq!(device_id_from_hostname("-x-"), "x");
        let long = "a".repeat(100);
        assert_eq!(device_id_from_hostname(&long).len(), MAX_DEVICE_ID_LEN);
        let edge = format!("{}.b", "a".repeat(63));
        let id = device_id_from_hostname(&edge);
        assert_eq!(id, "a".repeat(63), "no trailing dot after the cut");
        for h in ["raspberrypi", "Kamera Süd", "x/y?z#", "ünï"] {
            let id = device_id_from_hostname(h);
            if !id.is_empty() {
                assert!(
                    tierd_protocol::topic::validate_device_id(&id).is_ok(),
                    "{h} -> {id}"
                );
            }
        }
    }

    #[test]
    fn the_machine_tag_is_stable_keyed_and_short() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(machine_tag(id), machine_tag(&format!("{id}\n")));
        assert_eq!(machine_tag(id).len(), 16);
        assert_ne!(
            machine_tag(id),
            machine_tag("fedcba9876543210fedcba9876543210")
        );
        assert!(!machine_tag(id).contains("0123456789abcdef"));
    }
}

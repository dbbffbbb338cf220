//! The brokers under test: the relay's embedded one (chosen with [`RelayBroker`]) or a real
//! Mosquitto started for the test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::fixtures::{READY_TIMEOUT, SKIP_MOSQUITTO_ENV};
use crate::processes::Proc;
use tierd_devkit::port_accepts;

/// Where a relay gets its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayBroker {
    /// Embed rumqttd on a free port.
    Embedded,
    /// Join the broker at 127.0.0.1:`port` (`[mqtt]` section).
    External(u16),
}

/// Overrides where the Mosquitto binary is looked for (a path; if it is not a file, Mosquitto
/// counts as not installed).
pub const MOSQUITTO_BIN_ENV: &str = "TIERD_MOSQUITTO";

/// The Mosquitto broker binary, if installed: `$TIERD_MOSQUITTO`, else `/usr/sbin/mosquitto`, else
/// `mosquitto` on `PATH`.
pub fn mosquitto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(MOSQUITTO_BIN_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let standard = PathBuf::from("/usr/sbin/mosquitto");
    if standard.is_file() {
        return Some(standard);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    })
}

/// A running Mosquitto with a throwaway config; logs everything (including each PUBLISH it sends,
/// so tests can see which client got what).
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

/// Starts Mosquitto on 127.0.0.1:`port` and waits until it accepts connections.
///
/// Returns `None` (after printing a note) only when Mosquitto is not installed and
/// `TIERD_SKIP_MOSQUITTO=1`; without that variable a missing Mosquitto fails the test.
pub async fn start_mosquitto(port: u16) -> Option<Mosquitto> {
    let Some(binary) = mosquitto_binary() else {
        if std::env::var(SKIP_MOSQUITTO_ENV).as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: mosquitto is not installed and {SKIP_MOSQUITTO_ENV}=1; \
                 this Mosquitto test did not run"
            );
            return None;
        }
        panic!(
            "mosquitto is not installed (looked at ${MOSQUITTO_BIN_ENV} if set, else \
             /usr/sbin/mosquitto and PATH): `apt-get install mosquitto`, \
             or set {SKIP_MOSQUITTO_ENV}=1 to skip these tests"
        );
    };
    let dir = tempfile::Builder::new()
        .prefix("tierd-mosquitto-")
        .tempdir()
        .expect("cannot create a temp dir");
    let conf = format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type all\n\
         connection_messages true\n"
    );
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("cannot write mosquitto.conf");
    let mut cmd = Command::new(binary);
    cmd.arg("-c").arg(&conf_path);
    let mut proc = Proc::spawn("mosquitto", cmd, &dir.path().join("mosquitto.log"));
    let start = Instant::now();
    while !port_accepts(port) {
        proc.assert_running("starting");
        if start.elapsed() > READY_TIMEOUT {
            panic!(
                "mosquitto does not accept connections on port {port} after {READY_TIMEOUT:?}; its log:\n{}",
                proc.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Some(Mosquitto {
        proc,
        port,
        _dir: dir,
    })
}

impl Mosquitto {
    /// Waits until Mosquitto has acknowledged a subscription from `client_id`
    /// (e.g. `cloud-relay-r1`, `edge-agent-dev-1`).
    pub async fn wait_for_suback(&mut self, client_id: &str) {
        self.proc
            .wait_for_log(&format!("Sending SUBACK to {client_id}"), READY_TIMEOUT)
            .await;
    }

    /// How many PUBLISH packets on a topic containing `topic_part` Mosquitto sent to `client_id`.
    pub fn publishes_sent_to(&self, client_id: &str, topic_part: &str) -> usize {
        let prefix = format!("Sending PUBLISH to {client_id} ");
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains(&prefix) && l.contains(topic_part))
            .count()
    }
}

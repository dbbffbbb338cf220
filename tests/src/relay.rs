//! A `cloud-relay` process and its HTTP API.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::brokers::RelayBroker;
use crate::clients::http_client;
use crate::fixtures::{cloud_manifest, toml_path, READY_TIMEOUT, RELAY_READY};
use crate::processes::{daemon_command, free_port, Proc};

/// A running `cloud-relay`.
pub struct RelayProc {
    pub proc: Proc,
    /// The broker port the relay uses (its embedded one, or the external one it joined).
    pub broker_port: u16,
    /// Where its `/metrics` and `/api/devices` are served.
    pub http_port: u16,
    pub relay_id: String,
    _dir: TempDir,
}

impl RelayProc {
    /// Starts a relay and waits until it is connected and taking escalations.
    pub async fn start(relay_id: &str, broker: RelayBroker) -> RelayProc {
        Self::start_with(relay_id, broker, "").await
    }

    /// Like [`RelayProc::start`], with `extra` appended to relay.toml (whole sections, e.g.
    /// `[tuning]`), and `http_port` chosen by the caller if given.
    pub async fn start_with(relay_id: &str, broker: RelayBroker, extra: &str) -> RelayProc {
        Self::start_inner(relay_id, broker, "", extra).await
    }

    /// Joins the broker at 127.0.0.1:`port` with `mqtt_keys` added to its `[mqtt]` section
    /// (e.g. TLS files).
    pub async fn start_with_mqtt(
        relay_id: &str,
        port: u16,
        mqtt_keys: &str,
        extra: &str,
    ) -> RelayProc {
        Self::start_inner(relay_id, RelayBroker::External(port), mqtt_keys, extra).await
    }

    async fn start_inner(
        relay_id: &str,
        broker: RelayBroker,
        mqtt_keys: &str,
        extra: &str,
    ) -> RelayProc {
        // A port found free may be taken by the time the relay binds it; try a few.
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("tierd-relay-{relay_id}-"))
                .tempdir()
                .expect("cannot create a temp dir");
            let (broker_port, broker_section) = match broker {
                RelayBroker::Embedded => {
                    let port = free_port();
                    (
                        port,
                        format!("[embedded_broker]\nlisten = \"127.0.0.1:{port}\"\n"),
                    )
                }
                RelayBroker::External(port) => (
                    port,
                    format!("[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n{mqtt_keys}\n"),
                ),
            };
            let http_port = free_port();
            let config = format!(
                "relay_id = \"{relay_id}\"\nstate_dir = \"state\"\n\n[model]\nmanifest = {}\n\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\n\n{broker_section}\n{extra}\n",
                toml_path(&cloud_manifest())
            );
            let config_path = dir.path().join("relay.toml");
            std::fs::write(&config_path, &config).expect("cannot write relay.toml");
            let mut cmd = daemon_command("cloud-relay");
            cmd.arg("run").arg("--config").arg(&config_path);
            let mut proc = Proc::spawn(
                &format!("cloud-relay {relay_id}"),
                cmd,
                &dir.path().join("relay.log"),
            );
            let start = Instant::now();
            loop {
                if proc.log().contains(RELAY_READY) {
                    return RelayProc {
                        proc,
                        broker_port,
                        http_port,
                        relay_id: relay_id.to_owned(),
                        _dir: dir,
                    };
                }
                if proc.exit_status().is_some() {
                    let log = proc.log();
                    if log.contains("cannot listen") && attempt < 3 {
                        break; // port race: retry with another port
                    }
                    proc.assert_running("starting");
                }
                if start.elapsed() > READY_TIMEOUT {
                    panic!(
                        "cloud-relay {relay_id} did not log {RELAY_READY:?} within {READY_TIMEOUT:?}; its log:\n{}",
                        proc.log_tail(60)
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Kills the relay (SIGKILL).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM and waits for the exit (a graceful stop).
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.terminate(Duration::from_secs(15))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// GET on the relay's HTTP API: status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = http_client()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on relay {}: {e}", self.relay_id));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Polls `GET path` until it answers 200 with a body for which `done` holds; panics with
    /// the last body and the relay's log after 40 s.
    pub async fn wait_json(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let limit = Duration::from_secs(40);
        let start = Instant::now();
        loop {
            let (status, v) = self.get_json(path).await;
            if status == 200 && done(&v) {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "waited {limit:?} for {what} on {path}; last: {v:#}\nrelay log:\n{}",
                self.proc.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The relay's record of a device (`/api/devices/{device}`), once `done` holds.
    pub async fn wait_device(
        &self,
        device: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_json(&format!("/api/devices/{device}"), what, done)
            .await
    }

    /// The relay's view of a device's config (`/api/devices/{device}/config`), once `done`
    /// holds.
    pub async fn wait_device_config(
        &self,
        device: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_json(&format!("/api/devices/{device}/config"), what, done)
            .await
    }

    /// GET on the relay's HTTP API, parsed as JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: body is not JSON ({e}): {text}"));
        (status, body)
    }
}

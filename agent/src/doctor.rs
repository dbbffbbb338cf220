//! `edge-agent doctor --config F`: what stands between this board and a working agent, one line
//! per check, before anything is started for real.
//!
//! Checks, in order (a broken config stops the rest, since every other check reads it):
//! `config` (parses, validates; the device id and where it came from), `model` (each manifest:
//! sha256, golden vectors, signature if keys are pinned), `state` (the state directory exists
//! or can be made, and a file can be written and synced there), `http` (the listen address can
//! be bound; in use usually means an agent already runs), `broker` (a real MQTT connect with the
//! configured TLS and credentials, under a client id of its own so a running agent's session is
//! not taken over; a refused port, a CA that does not sign the broker's certificate and a wrong
//! password each get their own words), `energy` (the meters the config selects, INA219
//! included), `clock` (a board without a real-time clock boots in 1970 and then fails every TLS
//! handshake with "certificate not valid yet").
//!
//! Each line is `ok`, `warn` or `FAIL`, the check's name and what was found; the exit code is
//! non-zero when any check failed. The verdicts are plain data ([`Check`]) so the rendering and
//! the clock rule are unit-tested; the checks themselves do the I/O.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};

use crate::config::AgentConfig;
use crate::energy::{detect_source, EnergySource, MeterKind, Roots};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Ok,
            detail: detail.into(),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
        }
    }

    /// `ok    broker  connected to …`.
    pub fn line(&self) -> String {
        let v = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        format!("{v:<5} {:<7} {}", self.name, self.detail.replace('\n', " "))
    }
}

/// Unix ms of 2026-01-01: a clock before it has not been set (no RTC, no NTP yet).
pub const CLOCK_FLOOR_MS: u64 = 1_767_225_600_000;

/// The clock check for a wall clock of `now_ms`. Pure.
pub fn clock_check(now_ms: u64) -> Check {
    let secs = now_ms / 1000;
    let date = civil_date(secs);
    if now_ms < CLOCK_FLOOR_MS {
        Check::fail(
            "clock",
            format!(
                "the system clock says {date}: not set yet (no RTC, NTP not synced?); TLS \
                 certificates will not verify until it is (timedatectl status)"
            ),
        )
    } else {
        Check::ok("clock", format!("{date} UTC"))
    }
}

/// `YYYY-MM-DD` for Unix seconds (proleptic Gregorian, UTC).
fn civil_date(secs: u64) -> String {
    // Howard Hinnant's days-to-civil.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn config_check(path: &Path) -> Result<(AgentConfig, Check), Check> {
    match AgentConfig::load(path) {
        Ok(c) => {
            let detail = format!(
                "{} is valid; device_id {:?} (from {})",
                path.display(),
                c.device_id,
                c.device_id_source.describe()
            );
            Ok((c, Check::ok("config", detail)))
        }
        Err(e) => Err(Check::fail(
            "config",
            tierd_runtime::error_chain(&e).to_string(),
        )),
    }
}

fn model_checks(c: &AgentConfig) -> Vec<Check> {
    let mut out = Vec::new();
    let mut one = |manifest: &Path, keys: &[tierd_protocol::PublicKey]| {
        match tierd_runtime::Model::load_trusted(manifest, keys) {
            Ok(m) => out.push(Check::ok(
                "model",
                format!(
                    "{} from {}: sha256 and {} golden vectors ok{}",
                    m.id(),
                    manifest.display(),
                    m.manifest().golden.len(),
                    if keys.is_empty() {
                        ""
                    } else {
                        ", signed by a trusted key"
                    }
                ),
            )),
            Err(e) => out.push(Check::fail("model", tierd_runtime::error_chain(&e))),
        }
    };
    one(&c.model.manifest, &c.model.trusted_keys);
    for m in &c.models {
        one(&m.manifest, &c.model.trusted_keys);
    }
    out
}

fn state_check(c: &AgentConfig) -> Check {
    let dir = c.state_dir();
    let probe = dir.join(".doctor-probe");
    let result = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"tierd doctor\n")?;
        f.sync_all()?;
        std::fs::remove_file(&probe)
    });
    match result {
        Ok(()) => Check::ok("state", format!("{} is writable", dir.display())),
        Err(e) => Check::fail(
            "state",
            format!(
                "cannot write in the state directory {}: {e} (under systemd it must be the \
                 unit's StateDirectory=, see README)",
                dir.display()
            ),
        ),
    }
}

fn http_check(c: &AgentConfig) -> Check {
    match std::net::TcpListener::bind(c.http.listen) {
        Ok(_) => Check::ok("http", format!("{} can be bound", c.http.listen)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::warn(
            "http",
            format!(
                "{} is in use (an agent already running?): `run` would fail to bind it",
                c.http.listen
            ),
        ),
        Err(e) => Check::fail("http", format!("cannot bind {}: {e}", c.http.listen)),
    }
}

/// A real connect with the agent's MQTT settings; `None` when the config has no broker.
async fn broker_check(c: &AgentConfig, timeout: Duration) -> Check {
    let where_ = format!("{}:{}", c.mqtt.host, c.mqtt.port);
    // Our own client id: connecting as the agent would make the broker drop a running agent.
    let client_id = format!(
        "{}-doctor-{}",
        c.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| c.default_client_id()),
        std::process::id()
    );
    let mut options = match c.mqtt.options(&client_id) {
        Ok(o) => o,
        Err(e) => return Check::fail("broker", tierd_runtime::error_chain(&e)),
    };
    options.set_client_id(client_id);
    options.set_clean_start(true);
    let tls = if c.mqtt.ca_file.is_some() {
        " over TLS"
    } else {
        ""
    };
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(tierd_runtime::link::describe_connect_error(&e)),
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => {
            tierd_runtime::mqtt::disconnect(&client, &mut eventloop).await;
            let who = c
                .mqtt
                .username
                .as_deref()
                .map_or(String::new(), |u| format!(" as {u:?}"));
            Check::ok("broker", format!("connected to {where_}{tls}{who}"))
        }
        Ok(Err(why)) => Check::fail("broker", format!("{where_}{tls}: {why}")),
        Err(_) => Check::fail(
            "broker",
            format!(
                "{where_}{tls}: no answer within {timeout:?} (a firewall dropping packets, or \
                 not an MQTT broker?)"
            ),
        ),
    }
}

fn energy_checks(c: &AgentConfig, roots: &Roots) -> Vec<Check> {
    let found = detect_source(c.energy.source, roots, c.energy.ina219.as_ref());
    let mut out = Vec::new();
    let chosen = c.energy.source != EnergySource::Auto;
    for (kind, why) in &found.skipped {
        // A meter the config asks for (by source or an [energy.ina219] table) must work.
        let asked = chosen || (*kind == MeterKind::Ina219 && c.energy.ina219.is_some());
        if asked {
            out.push(Check::fail("energy", format!("{kind}: {why}")));
        } else {
            out.push(Check::ok("energy", format!("{kind} not used: {why}")));
        }
    }
    for m in &found.meters {
        let detail = format!(
            "{} ({}), {}, {}",
            m.name(),
            m.kind(),
            if m.estimated() {
                "ESTIMATED from CPU time"
            } else {
                "measured"
            },
            m.source()
        );
        if m.estimated() && found.meters.len() == 1 {
            out.push(Check::warn(
                "energy",
                format!("{detail}: no measuring meter on this board"),
            ));
        } else {
            out.push(Check::ok("energy", detail));
        }
    }
    out
}

/// Runs every check for the config at `path` and prints one line each to `out`; true when none
/// failed.
pub fn run(path: &Path, broker_timeout: Duration, out: &mut dyn Write) -> std::io::Result<bool> {
    tierd_runtime::mqtt::install_crypto_provider();
    let mut checks = Vec::new();
    match config_check(path) {
        Err(fail) => checks.push(fail),
        Ok((c, ok)) => {
            checks.push(ok);
            checks.extend(model_checks(&c));
            checks.push(state_check(&c));
            checks.push(http_check(&c));
            let broker = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(broker_check(&c, broker_timeout)))
                .unwrap_or_else(|e| Check::fail("broker", format!("no async runtime: {e}")));
            checks.push(broker);
            checks.extend(energy_checks(&c, &Roots::default()));
            checks.push(clock_check(tierd_runtime::unix_ms()));
        }
    }
    for c in &checks {
        writeln!(out, "{}", c.line())?;
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed > 0 {
        writeln!(out, "{failed} checks failed")?;
    } else {
        writeln!(out, "all checks passed")?;
    }
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_aligned_and_say_the_verdict() {
        assert_eq!(
            Check::fail("broker", "x:1: refused\nagain").line(),
            "FAIL  broker  x:1: refused again"
        );
        assert_eq!(Check::ok("clock", "fine").line(), "ok    clock   fine");
        assert!(Check::warn("http", "busy").line().starts_with("warn  http"));
    }

    #[test]
    fn an_unset_clock_fails_and_says_what_it_breaks() {
        let c = clock_check(0);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.detail.contains("1970-01-01") && c.detail.contains("TLS"),
            "{}",
            c.detail
        );
        let c = clock_check(1_796_169_600_000); // 2026-12-02
        assert_eq!(
            (c.verdict, c.detail.as_str()),
            (Verdict::Ok, "2026-12-02 UTC")
        );
        assert_eq!(civil_date(951_782_400), "2000-02-29");
        assert_eq!(civil_date(1_767_225_600), "2026-01-01");
    }

    #[test]
    fn a_broken_config_is_one_failed_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "[cascade]\nthreshhold = 0.5\n").unwrap();
        let mut out = Vec::new();
        assert!(!run(&p, Duration::from_secs(1), &mut out).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("FAIL  config"), "{text}");
        assert!(text.contains("unknown field"), "{text}");
        let missing = dir.path().join("nope.toml");
        let mut out = Vec::new();
        assert!(!run(&missing, Duration::from_secs(1), &mut out).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }
}

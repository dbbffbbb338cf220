//! What signing costs: a config document parsed bare (the baseline: what an agent did before
//! documents were signed), verified and parsed, signed by the relay, and applied by the agent
//! end to end (`RemoteConfig::handle`: verify, range-check, persist to disk with fsync). One
//! thread, interleaved rounds, so the ratios compare like with like.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use edge_agent::policy::Policy;
use edge_agent::remote_config::{Outcome, RemoteConfig};
use tierd_protocol::{signed, ConfigDocument, Settings, Signal, Signer};

use crate::stats::median;

fn doc(version: u64) -> ConfigDocument {
    ConfigDocument {
        version,
        epoch: 0,
        device_id: "bench-1".into(),
        issued_ms: 1_800_000_000_000,
        source: "tuner".into(),
        settings: Settings {
            threshold: Some(0.93),
            audit_rate: Some(0.05),
            ..Default::default()
        },
        certificate: None,
    }
}

/// Mean time of `f` over `n` calls.
fn time_per(n: usize, mut f: impl FnMut(usize)) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed() / n as u32
}

pub fn run(rounds: usize, iterations: usize) -> anyhow::Result<String> {
    let signer = Signer::from_pkcs8(&Signer::generate_pkcs8()?)?;
    let trusted = [signer.public().clone()];
    let bare = doc(7).to_json();
    let payload = signer.sign(&doc(7));
    let dir = tempfile::tempdir()?;
    let base = Policy {
        threshold: 0.9,
        signal: Signal::MaxProb,
        escalation_timeout: Duration::from_millis(250),
        audit_rate: 0.02,
        telemetry_interval: Duration::from_secs(30),
        config_version: 0,
    };
    let (mut rc, _) = RemoteConfig::load(dir.path(), "bench-1", base, trusted.to_vec());
    let mut version = 1_000;
    let applies = iterations.clamp(1, 200);
    let (mut parse, mut verify, mut sign, mut apply) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        parse.push(time_per(iterations, |_| {
            std::hint::black_box(ConfigDocument::from_json(&bare).ok());
        }));
        verify.push(time_per(iterations, |_| {
            std::hint::black_box(signed::verify(&payload, &trusted).ok());
        }));
        sign.push(time_per(iterations, |i| {
            std::hint::black_box(signer.sign(&doc(i as u64)));
        }));
        // Each apply is a new version: verified, checked, written and fsynced.
        let signed: Vec<Vec<u8>> = (0..applies)
            .map(|_| {
                version += 1;
                signer.sign(&doc(version))
            })
            .collect();
        let mut applied = 0;
        apply.push(time_per(applies, |i| {
            if matches!(rc.handle(&signed[i]), Outcome::Applied(..)) {
                applied += 1;
            }
        }));
        anyhow::ensure!(
            applied == applies,
            "only {applied} of {applies} documents applied"
        );
    }
    let us = |v: &[Duration]| median(v.iter().map(|d| d.as_secs_f64() * 1e6));
    let (p, v, s, a) = (us(&parse), us(&verify), us(&sign), us(&apply));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n### 7. Signed config documents (per document, one core)\n"
    );
    let _ = writeln!(
        o,
        "Median of {rounds} rounds; {iterations} documents per round ({applies} applies). \
         Document of {} bytes, signed payload {} bytes.\n",
        bare.len(),
        payload.len()
    );
    let _ = writeln!(o, "| step | µs per document | vs bare parse |");
    let _ = writeln!(o, "|---|---:|---:|");
    let _ = writeln!(
        o,
        "| agent: parse a bare document (before signing) | {p:.2} | 1.00x |"
    );
    let _ = writeln!(
        o,
        "| agent: verify Ed25519 + parse | {v:.2} | {:.2}x |",
        v / p
    );
    let _ = writeln!(o, "| relay: sign | {s:.2} | {:.2}x |", s / p);
    let _ = writeln!(
        o,
        "| agent: apply end to end (verify, check, persist with fsync) | {a:.1} | {:.0}x |",
        a / p
    );
    Ok(o)
}

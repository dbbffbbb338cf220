//! `tierd-replay`: the evaluation stream through the cascade rule and the relay's tuner — the
//! same code the daemons run — with a drift phase, then seeded replays to check how often the
//! certified agreement target is violated.
//!
//! Phases: the first half of `models/eval/stream.bin`, all of `models/eval/drift.bin`
//! (heavily degraded images), then the second half of `stream.bin` (recovery).

mod sim;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use edge_agent::cascade::{self, Signal};
use tierd_devkit::repo_path;
use tierd_runtime::{stream, Model};

use crate::sim::{Config, Item};

#[derive(Parser)]
#[command(
    name = "tierd-replay",
    about = "Replay the evaluation stream through cascade + the relay's tuner, with its defaults"
)]
struct Args {
    /// Agreement-with-the-cloud target the tuner certifies (default: the relay's).
    #[arg(long)]
    target: Option<f64>,
    /// Risk of the certificate being wrong (default: the relay's).
    #[arg(long)]
    delta: Option<f64>,
    /// Fraction of local answers audited (default: the agent's).
    #[arg(long)]
    audit_rate: Option<f64>,
    /// Requests of evidence in the tuner's sliding window (default: the relay's).
    #[arg(long)]
    window: Option<u64>,
    /// Requests between telemetry reports (each one re-tunes): request rate × interval.
    #[arg(long, default_value_t = 300)]
    report_every: usize,
    /// Simulated request rate (the relay's push clock: at most one push per
    /// `tuning.min_interval_s`, but for drift).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Requests per printed row.
    #[arg(long, default_value_t = 1000)]
    row_every: usize,
    /// Threshold at start (default: the agent's: the model's offline certificate).
    #[arg(long)]
    initial_threshold: Option<f32>,
    /// Ignore the models' offline certificates (the relay then starts from online evidence).
    #[arg(long)]
    no_offline: bool,
    /// Seeded replays per edge model (each shuffles every phase and redraws the audits).
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    /// Edge model manifests; the first gets the per-row table and the plot.
    #[arg(long, default_values_t = ["models/edge/digits-edge.toml".to_string(), "models/edge/digits-edge-tiny.toml".to_string()])]
    edge: Vec<String>,
    /// Where to write the SVG plot of the unshuffled replay.
    #[arg(long, default_value = "docs/replay-drift.svg")]
    svg: PathBuf,
}

fn items(
    edge: &Model,
    cloud: &Model,
    records: &[stream::Record],
    phase: usize,
) -> anyhow::Result<Vec<Item>> {
    records
        .iter()
        .map(|r| {
            let t = edge.manifest().wire_input(&to_f32(&r.pixels));
            let e = edge.predict(&t)?.probabilities;
            let c = cloud.predict(&t)?.probabilities;
            Ok(Item {
                confidence: cascade::confidence(&e, Signal::MaxProb),
                edge_top1: cascade::top1(&e) as u8,
                cloud_top1: cascade::top1(&c) as u8,
                label: r.label,
                phase,
            })
        })
        .collect()
}

/// What the seeded replays of one edge model found.
struct Summary {
    model: String,
    start: f32,
    clean_escalation: f64,
    clean_audits: f64,
    clean_oracle: f64,
    overall_escalation: f64,
    overall_audits: f64,
    online_issued: u64,
    online_missed: u64,
    in_force_clean: u64,
    in_force_missed: u64,
    median_online: f32,
    offline_share: f64,
    back_after: Vec<usize>,
    drift_alarms: f64,
    rows_below_clean: f64,
}

/// Requests from the drift start until a row is back on target (`None`: never).
fn recovery(rows: &[sim::Row], drift_start: usize, target: f64) -> Option<usize> {
    rows.iter()
        .filter(|r| r.start >= drift_start)
        .find(|r| r.agreement >= target)
        .map(|r| r.start + r.requests - drift_start)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay = cloud_relay::config::RelayConfig::default();
    let agent = edge_agent::config::CascadeConfig::default();
    let mut setup = relay.tuner_setup();
    let (target, delta) = match setup.policy {
        cloud_relay::tuner::Policy::TargetAgreement { target, delta } => {
            (args.target.unwrap_or(target), args.delta.unwrap_or(delta))
        }
        _ => bail!("the relay's default policy is not target_agreement"),
    };
    setup.policy = cloud_relay::tuner::Policy::TargetAgreement { target, delta };
    if let Some(w) = args.window {
        setup.evidence.window_requests = w;
    }
    let audit_rate = args.audit_rate.unwrap_or(agent.audit_rate);
    if !(0.0..1.0).contains(&target) || !(0.0..0.5).contains(&delta) {
        bail!("--target must be in [0, 1) and --delta in [0, 0.5)");
    }
    if !(0.0..=1.0).contains(&audit_rate) || args.report_every == 0 || args.rate <= 0.0 {
        bail!("--audit-rate must be in [0, 1]; --report-every at least 1; --rate positive");
    }
    let cloud = Model::load(&repo_path("models/cloud/digits-cloud.toml"))?;
    let clean = stream::read(&repo_path("models/eval/stream.bin"))?;
    let drift = stream::read(&repo_path("models/eval/drift.bin"))?;
    let half = clean.len() / 2;
    let names = ["clean", "DRIFT", "clean"];
    let mut o = String::new();
    writeln!(
        o,
        "<!-- cargo run --release -p tierd-replay -- --seeds {} (target {target}, delta {delta}, audit rate {audit_rate}, window {} requests, drift test on the last {} at {}, a report every {} requests at {} req/s, min push interval {} ms) -->",
        args.seeds,
        setup.evidence.window_requests,
        setup.evidence.recent_requests,
        setup.evidence.drift_delta,
        args.report_every,
        args.rate,
        relay.push_rules().min_interval_ms,
    )?;
    let mut summaries = Vec::new();
    for (k, path) in args.edge.iter().enumerate() {
        let edge = Model::load(&repo_path(path))?;
        eprintln!(
            "{}: running both models over {} images once",
            edge.id(),
            clean.len() + drift.len()
        );
        let phases = vec![
            items(&edge, &cloud, &clean[..half], 0)?,
            items(&edge, &cloud, &drift, 1)?,
            items(&edge, &cloud, &clean[half..], 2)?,
        ];
        let (start, _) = match args.initial_threshold {
            Some(t) => (t, "--initial-threshold"),
            None if args.no_offline => (
                agent
                    .threshold
                    .unwrap_or(edge_agent::config::UNCALIBRATED_THRESHOLD),
                "default",
            ),
            None => agent.start_threshold(edge.manifest()),
        };
        let cfg = Config {
            setup,
            rules: relay.push_rules(),
            audit_rate,
            initial_threshold: start,
            offline: if args.no_offline {
                None
            } else {
                edge_agent::link::model_calibration(edge.manifest())
            },
            report_every: args.report_every,
            rate: args.rate,
            row_every: args.row_every,
        };
        let drift_start = phases[0].len();
        if k == 0 {
            writeln!(o, "\n### {} (starts at {start}), file order\n", edge.id())?;
            writeln!(o, "Phases: {} clean, {} drift, {} clean requests. Agreement = answer equals the cloud model's top-1. Cloud calls = escalations + audits.\n", phases[0].len(), phases[1].len(), phases[2].len())?;
            writeln!(o, "| requests | phase | threshold | agreement | escalated | cloud calls | oracle | accuracy |")?;
            writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|")?;
            let base = sim::run(&phases, &cfg, 0);
            for r in &base.rows {
                let flag = if r.agreement < target { " ⚠" } else { "" };
                writeln!(
                    o,
                    "| {}–{} | {} | {:.3} | {:.4}{flag} | {:.1}% | {:.1}% | {:.1}% | {:.2}% |",
                    r.start,
                    r.start + r.requests,
                    names[r.phase],
                    r.threshold,
                    r.agreement,
                    100.0 * r.escalation_rate,
                    100.0 * (r.escalation_rate + r.audits as f64 / r.requests.max(1) as f64),
                    100.0 * r.oracle_rate,
                    100.0 * r.accuracy,
                )?;
            }
            writeln!(
                o,
                "\nDrift: agreement back at or above {target} for the row ending {} requests after the drift began; {} drift alarm(s), {} push(es).",
                recovery(&base.rows, drift_start, target).map_or("never".to_string(), |n| n.to_string()),
                base.drift_alarms,
                base.pushes
            )?;
            let svg = plot(&base.rows, target, drift_start, phases[1].len());
            if let Some(dir) = args.svg.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&args.svg, svg)
                .with_context(|| format!("writing {}", args.svg.display()))?;
            eprintln!("plot written to {}", args.svg.display());
        }
        let mut s = Summary {
            model: edge.id(),
            start,
            clean_escalation: 0.0,
            clean_audits: 0.0,
            clean_oracle: 0.0,
            overall_escalation: 0.0,
            overall_audits: 0.0,
            online_issued: 0,
            online_missed: 0,
            in_force_clean: 0,
            in_force_missed: 0,
            median_online: f32::NAN,
            offline_share: 0.0,
            back_after: Vec::new(),
            drift_alarms: 0.0,
            rows_below_clean: 0.0,
        };
        let (mut clean_rows, mut clean_req, mut clean_esc, mut clean_aud, mut clean_orc) =
            (0usize, 0usize, 0.0, 0.0, 0.0);
        let (mut req, mut esc, mut aud) = (0usize, 0usize, 0usize);
        let (mut below, mut offline_n, mut all_n) = (0usize, 0u64, 0u64);
        let mut online_t: Vec<f32> = Vec::new();
        for seed in 1..=args.seeds {
            let out = sim::run(&phases, &cfg, seed);
            for i in &out.issued {
                all_n += 1;
                offline_n += u64::from(i.in_force.basis == cloud_relay::tuner::Basis::Offline);
                if !i.clean {
                    continue;
                }
                if !i.certificate.insufficient_evidence {
                    s.online_issued += 1;
                    s.online_missed += u64::from(i.true_agreement < target);
                    online_t.push(i.certificate.threshold);
                }
                s.in_force_clean += 1;
                s.in_force_missed += u64::from(i.in_force_agreement < target);
            }
            // The first clean phase, once the evidence window has filled (the steady state).
            for r in out.rows.iter().filter(|r| r.phase == 0 && r.start >= 2_000) {
                clean_rows += 1;
                clean_req += r.requests;
                clean_esc += r.escalation_rate * r.requests as f64;
                clean_aud += r.audits as f64;
                clean_orc += r.oracle_rate * r.requests as f64;
                below += usize::from(r.agreement < target);
            }
            if let Some(n) = recovery(&out.rows, drift_start, target) {
                s.back_after.push(n);
            }
            s.drift_alarms += out.drift_alarms as f64;
            req += out.rows.iter().map(|r| r.requests).sum::<usize>();
            esc += out.escalations;
            aud += out.audits;
        }
        let n = clean_req.max(1) as f64;
        s.clean_escalation = clean_esc / n;
        s.clean_audits = clean_aud / n;
        s.clean_oracle = clean_orc / n;
        s.rows_below_clean = below as f64 / clean_rows.max(1) as f64;
        s.overall_escalation = esc as f64 / req.max(1) as f64;
        s.overall_audits = aud as f64 / req.max(1) as f64;
        s.offline_share = offline_n as f64 / all_n.max(1) as f64;
        s.drift_alarms /= args.seeds.max(1) as f64;
        online_t.sort_by(f32::total_cmp);
        s.median_online = online_t
            .get(online_t.len() / 2)
            .copied()
            .unwrap_or(f32::NAN);
        s.back_after.sort_unstable();
        summaries.push(s);
    }

    writeln!(o, "\n### {} seeded replays per edge model\n", args.seeds)?;
    let mut header = "| |".to_string();
    let mut rule = "|---|".to_string();
    for s in &summaries {
        header.push_str(&format!(" {} (starts at {}) |", s.model, s.start));
        rule.push_str("---:|");
    }
    writeln!(o, "{header}\n{rule}")?;
    let row = |o: &mut String, name: &str, f: &dyn Fn(&Summary) -> String| -> std::fmt::Result {
        write!(o, "| {name} |")?;
        for s in &summaries {
            write!(o, " {} |", f(s))?;
        }
        writeln!(o)
    };
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    row(
        &mut o,
        "clean stream, after 2,000 requests: escalated",
        &|s| pct(s.clean_escalation),
    )?;
    row(&mut o, "… cloud calls (escalations + audits)", &|s| {
        pct(s.clean_escalation + s.clean_audits)
    })?;
    row(&mut o, "… oracle (edge/cloud disagreements)", &|s| {
        pct(s.clean_oracle)
    })?;
    row(&mut o, "… 1,000-request rows below the target", &|s| {
        pct(s.rows_below_clean)
    })?;
    row(
        &mut o,
        "whole replay (clean, drift, clean): escalated / cloud calls",
        &|s| {
            format!(
                "{} / {}",
                pct(s.overall_escalation),
                pct(s.overall_escalation + s.overall_audits)
            )
        },
    )?;
    row(
        &mut o,
        "online certificates on single-phase evidence",
        &|s| s.online_issued.to_string(),
    )?;
    row(
        &mut o,
        "… whose threshold misses the target on that phase",
        &|s| {
            format!(
                "{} ({:.2}%, δ = {delta})",
                s.online_missed,
                100.0 * s.online_missed as f64 / s.online_issued.max(1) as f64
            )
        },
    )?;
    row(&mut o, "… median online threshold", &|s| {
        format!("{:.3}", s.median_online)
    })?;
    row(
        &mut o,
        "thresholds in force (single-phase evidence) missing the target",
        &|s| {
            format!(
                "{} of {} ({:.2}%)",
                s.in_force_missed,
                s.in_force_clean,
                100.0 * s.in_force_missed as f64 / s.in_force_clean.max(1) as f64
            )
        },
    )?;
    row(
        &mut o,
        "reports with the offline certificate in force",
        &|s| pct(s.offline_share),
    )?;
    row(&mut o, "drift alarms per replay", &|s| {
        format!("{:.2}", s.drift_alarms)
    })?;
    row(
        &mut o,
        "back on target after the drift began (median, max requests)",
        &|s| {
            let never = args.seeds as usize - s.back_after.len();
            let med = s
                .back_after
                .get(s.back_after.len() / 2)
                .map_or("never".into(), |v| v.to_string());
            let max = s
                .back_after
                .last()
                .map_or("never".into(), |v| v.to_string());
            if never > 0 {
                format!("{med}, {max}; never in {never}")
            } else {
                format!("{med}, {max}")
            }
        },
    )?;
    print!("{o}");
    Ok(())
}

/// A small SVG line chart: agreement (left axis, 0.9–1) and escalation rates (right, 0–100 %).
fn plot(rows: &[sim::Row], target: f64, drift_start: usize, drift_len: usize) -> String {
    let (w, h, m) = (900.0, 360.0, 50.0);
    let total = rows.last().map_or(1, |r| r.start + r.requests) as f64;
    let x = |req: f64| m + (w - 2.0 * m) * req / total;
    let y_agree = |a: f64| h - m - (h - 2.0 * m) * ((a - 0.9) / 0.1).clamp(0.0, 1.0);
    let y_rate = |r: f64| h - m - (h - 2.0 * m) * r.clamp(0.0, 1.0);
    let line = |f: &dyn Fn(&sim::Row) -> f64, y: &dyn Fn(f64) -> f64| {
        rows.iter()
            .map(|r| {
                format!(
                    "{:.1},{:.1}",
                    x(r.start as f64 + r.requests as f64 / 2.0),
                    y(f(r))
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<rect x="{dx:.1}" y="{m}" width="{dw:.1}" height="{ih}" fill="#fde7e7"/>
<text x="{dtx:.1}" y="{ty}" fill="#a33">drift</text>
<line x1="{m}" y1="{yt:.1}" x2="{xr}" y2="{yt:.1}" stroke="#2a7" stroke-dasharray="4 3"/>
<text x="{xr2}" y="{yt:.1}" fill="#2a7">target {target}</text>
<polyline fill="none" stroke="#2a7" stroke-width="2" points="{agree}"/>
<polyline fill="none" stroke="#36c" stroke-width="2" points="{esc}"/>
<polyline fill="none" stroke="#999" stroke-width="1.5" stroke-dasharray="2 2" points="{oracle}"/>
<line x1="{m}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/>
<line x1="{m}" y1="{m}" x2="{m}" y2="{yb}" stroke="black"/>
<line x1="{xr}" y1="{m}" x2="{xr}" y2="{yb}" stroke="black"/>
<text x="5" y="{m}" fill="#2a7">1.00</text><text x="5" y="{yb}" fill="#2a7">0.90</text>
<text x="{xr3}" y="{m}" fill="#36c">100%</text><text x="{xr3}" y="{yb}" fill="#36c">0%</text>
<text x="{m}" y="{by}">agreement with cloud (green, left) · escalated (blue, right) · oracle escalation (grey, right) · x: requests 0–{total}</text>
</svg>
"##,
        dx = x(drift_start as f64),
        dw = x((drift_start + drift_len) as f64) - x(drift_start as f64),
        ih = h - 2.0 * m,
        dtx = x(drift_start as f64) + 4.0,
        ty = m + 14.0,
        yt = y_agree(target),
        xr = w - m,
        xr2 = w - m - 80.0,
        xr3 = w - m + 4.0,
        yb = h - m,
        by = h - 15.0,
        agree = line(&|r| r.agreement, &y_agree),
        esc = line(&|r| r.escalation_rate, &y_rate),
        oracle = line(&|r| r.oracle_rate, &y_rate),
    );
    s
}

/// Pixels as the wire values a manifest's golden vectors and `wire_input` take.
fn to_f32(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| f32::from(p)).collect()
}

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
    about = "Replay the evaluation stream through cascade + tuner"
)]
struct Args {
    /// Agreement-with-the-cloud target the tuner certifies.
    #[arg(long, default_value_t = 0.99)]
    target: f64,
    /// Risk of the certificate being wrong (one-sided, per tuning decision).
    #[arg(long, default_value_t = 0.05)]
    delta: f64,
    /// Fraction of confident requests audited.
    #[arg(long, default_value_t = 0.02)]
    audit_rate: f64,
    /// Requests of evidence in the tuner's sliding window.
    #[arg(long, default_value_t = 8000)]
    window: usize,
    /// Requests between tuning runs.
    #[arg(long, default_value_t = 250)]
    retune_every: usize,
    /// Requests per printed row.
    #[arg(long, default_value_t = 1000)]
    report_every: usize,
    /// Threshold at start.
    #[arg(long, default_value_t = 0.9)]
    initial_threshold: f32,
    /// Seeded replays (each shuffles every phase and redraws the audits).
    #[arg(long, default_value_t = 200)]
    seeds: u64,
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
            let t = edge.manifest().wire_input(r.pixels.clone());
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(0.0..1.0).contains(&args.target) || !(0.0..0.5).contains(&args.delta) {
        bail!("--target must be in [0, 1) and --delta in [0, 0.5)");
    }
    if !(0.0..=1.0).contains(&args.audit_rate) || args.window == 0 || args.retune_every == 0 {
        bail!("--audit-rate must be in [0, 1]; --window and --retune-every at least 1");
    }
    let edge = Model::load(&repo_path("models/edge/digits-edge.toml"))?;
    let cloud = Model::load(&repo_path("models/cloud/digits-cloud.toml"))?;
    let clean = stream::read(&repo_path("models/eval/stream.bin"))?;
    let drift = stream::read(&repo_path("models/eval/drift.bin"))?;
    let half = clean.len() / 2;
    eprintln!(
        "running both models over {} images once",
        clean.len() + drift.len()
    );
    let phases = vec![
        items(&edge, &cloud, &clean[..half], 0)?,
        items(&edge, &cloud, &drift, 1)?,
        items(&edge, &cloud, &clean[half..], 2)?,
    ];
    let cfg = Config {
        target: args.target,
        delta: args.delta,
        audit_rate: args.audit_rate,
        initial_threshold: args.initial_threshold,
        window: args.window,
        retune_every: args.retune_every,
        report_every: args.report_every,
        min_requests: 1000,
    };
    let names = ["clean", "DRIFT", "clean"];

    let mut o = String::new();
    writeln!(
        o,
        "<!-- cargo run --release -p tierd-replay -- --target {} --delta {} --audit-rate {} --window {} --retune-every {} --seeds {} -->",
        args.target, args.delta, args.audit_rate, args.window, args.retune_every, args.seeds
    )?;
    writeln!(o, "Phases: {} clean, {} drift, {} clean requests. Agreement = answer equals the cloud model's top-1.\n", phases[0].len(), phases[1].len(), phases[2].len())?;
    writeln!(o, "| requests | phase | threshold | agreement | escalated | oracle | escalated / oracle | accuracy | audits |")?;
    writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let base = sim::run(&phases, &cfg, 0);
    for r in &base.rows {
        let flag = if r.agreement < args.target {
            " ⚠"
        } else {
            ""
        };
        writeln!(
            o,
            "| {}–{} | {} | {:.3} | {:.4}{flag} | {:.1}% | {:.1}% | {:.2}x | {:.2}% | {} |",
            r.start,
            r.start + r.requests,
            names[r.phase],
            r.threshold,
            r.agreement,
            100.0 * r.escalation_rate,
            100.0 * r.oracle_rate,
            r.escalation_rate / r.oracle_rate.max(1e-9),
            100.0 * r.accuracy,
            r.audits
        )?;
    }
    // Recovery after drift: requests from the drift start until a row is back on target.
    let drift_start = phases[0].len();
    let back = base
        .rows
        .iter()
        .filter(|r| r.start >= drift_start)
        .find(|r| r.agreement >= args.target)
        .map(|r| r.start - drift_start);
    writeln!(
        o,
        "\nDrift: first row back on target starts {} requests after the drift began.",
        back.map_or("never".to_string(), |n| n.to_string())
    )?;

    // Seeded replays: how often a certificate issued on clean evidence was wrong.
    let (mut issued, mut violated, mut issued_mixed, mut violated_mixed) = (0u64, 0u64, 0u64, 0u64);
    let (mut audits, mut requests, mut esc) = (0usize, 0usize, 0usize);
    let mut per_seed_violation = 0u64;
    let mut certified: Vec<f32> = Vec::new();
    for seed in 1..=args.seeds {
        let out = sim::run(&phases, &cfg, seed);
        let mut any = false;
        for i in &out.issued {
            let bad = i.true_agreement < args.target;
            if i.clean {
                certified.push(i.certificate.threshold);
                issued += 1;
                violated += u64::from(bad);
                any |= bad;
            } else {
                issued_mixed += 1;
                violated_mixed += u64::from(bad);
            }
        }
        per_seed_violation += u64::from(any);
        audits += out.audits;
        esc += out.escalations;
        requests += out.rows.iter().map(|r| r.requests).sum::<usize>();
    }
    let oracle: f64 = phases.iter().flatten().filter(|i| !i.agree()).count() as f64
        / phases.iter().map(Vec::len).sum::<usize>() as f64;
    writeln!(o, "\n| {} seeded replays | value |", args.seeds)?;
    writeln!(o, "|---|---:|")?;
    writeln!(
        o,
        "| certificates on single-phase evidence | {issued} |\n| … whose threshold misses the target on that phase's population | {violated} ({:.2}%, δ = {}) |",
        100.0 * violated as f64 / issued.max(1) as f64,
        args.delta
    )?;
    certified.sort_by(f32::total_cmp);
    let median = certified
        .get(certified.len() / 2)
        .copied()
        .unwrap_or(f32::NAN);
    writeln!(
        o,
        "| median certified threshold (single-phase evidence) | {median:.3} |"
    )?;
    writeln!(
        o,
        "| replays with at least one such miss | {per_seed_violation} ({:.1}%) |",
        100.0 * per_seed_violation as f64 / args.seeds.max(1) as f64
    )?;
    writeln!(
        o,
        "| certificates while drift was in the window (no guarantee) | {issued_mixed}, {violated_mixed} missing the target |"
    )?;
    writeln!(
        o,
        "| escalation rate, all replays | {:.1}% (oracle {:.1}%) |",
        100.0 * esc as f64 / requests.max(1) as f64,
        100.0 * oracle
    )?;
    writeln!(
        o,
        "| audit overhead (cloud calls for audits / requests) | {:.2}% |",
        100.0 * audits as f64 / requests.max(1) as f64
    )?;
    print!("{o}");

    let svg = plot(&base.rows, args.target, drift_start, phases[1].len());
    if let Some(dir) = args.svg.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.svg, svg).with_context(|| format!("writing {}", args.svg.display()))?;
    eprintln!("plot written to {}", args.svg.display());
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

//! `tierd-bench`: each tierd path measured next to its baseline in the same run, A/B rounds
//! interleaved, reported as medians of rounds and ratios (the numbers move with the machine; the
//! ratios much less).
//!
//! 1. local path: raw tract forward vs. the agent's whole HTTP path answered by the edge;
//! 2. escalation: an HTTP request answered by the cloud vs. a raw MQTT v5 echo through the same
//!    embedded broker;
//! 3. memory of the real `edge-agent` binary at idle and under a mixed load;
//! 4. throughput: confident-only vs. the mixed evaluation stream;
//! 5. sizes of the stripped release binaries;
//! 8. a model rollout: transfer bytes and time, and the shadow's CPU cost (`--rollout-only`).
//!
//! Prints progress on stderr and a markdown report on stdout. Exits non-zero if any request
//! fails or is answered from the wrong tier.

mod inproc;
mod inputs;
mod oip;
mod rollout;
mod rss;
mod signing;
mod sizes;
mod stats;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tierd_devkit::{repo_path, CLOUD_MANIFEST, EDGE_MANIFEST};
use tierd_runtime::{stream, Model};

use crate::inproc::{Echo, Job, Servers};
use crate::inputs::{example, Example};
use crate::stats::{median, round_ratio_range, Series};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tierd-bench",
    about = "tierd paths next to their baselines, interleaved A/B rounds, markdown report on stdout"
)]
struct Args {
    /// A/B rounds per comparison; the report gives the median over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timed requests (or forwards, or echoes) per side per round in the latency comparisons.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Untimed requests per side before the first round.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Records of models/eval/stream.bin in the mixed throughput stream (and requests in the
    /// confident-only one).
    #[arg(long, default_value_t = 5000)]
    stream_records: usize,
    /// Requests in flight in the throughput and memory benchmarks.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds of load on the edge-agent subprocess in the memory benchmark.
    #[arg(long, default_value_t = 10.0)]
    load_seconds: f64,
    /// Skip the memory benchmark (which needs target/release/{edge-agent,cloud-relay}).
    #[arg(long)]
    skip_rss: bool,
    /// Run only benchmark 7 (signed config documents: sign, verify, apply).
    #[arg(long)]
    signing_only: bool,
    /// Run only benchmark 4d (escalations through the relay's OIP backend to a real MLServer,
    /// next to the tract backend; needs scripts/install-test-deps).
    #[arg(long)]
    oip_only: bool,
    /// Run only benchmark 8 (a model rollout: transfer, and the shadow's cost on the
    /// edge-agent binary next to it; --stream-records requests per round).
    #[arg(long)]
    rollout_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.iterations == 0 || args.concurrency == 0 {
        bail!("--rounds, --iterations and --concurrency must be at least 1");
    }
    if args.stream_records == 0 || !(args.load_seconds > 0.0 && args.load_seconds <= 600.0) {
        bail!("--stream-records must be at least 1 and --load-seconds within (0, 600]");
    }

    if args.signing_only {
        println!("{}", signing::run(args.rounds, args.iterations)?);
        return Ok(());
    }
    if args.rollout_only {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let report = rt.block_on(rollout::run(args.rounds, args.stream_records))?;
        rt.shutdown_timeout(Duration::from_secs(2));
        println!("{report}");
        return Ok(());
    }
    if args.oip_only {
        // Relays and agents in process on a multi-threaded runtime, as the daemons run.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let report = rt.block_on(oip::run(args.rounds, args.iterations, args.warmup))?;
        rt.shutdown_timeout(Duration::from_secs(2));
        println!("{report}");
        return Ok(());
    }

    // The servers get a runtime like the daemons' (one worker per core); the client drives the
    // load from its own single thread, like a separate local app would.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-server")
        .build()?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let servers = server_rt.block_on(inproc::start_servers())?;
    eprintln!(
        "threshold pinned at {} (relay tuning.push = false: the tuner proposes, never pushes)",
        servers.threshold
    );
    let result = client_rt.block_on(run(&args, servers, server_rt.handle()));
    server_rt.shutdown_timeout(Duration::from_secs(2));
    let report = result?;
    println!("{report}");
    Ok(())
}

struct Latency {
    forward: Series,
    http_edge: Series,
    echo: Series,
    http_cloud: Series,
    cloud_forward: Series,
    echo_payload_bytes: usize,
}

struct Tput {
    confident_rps: Vec<f64>,
    mixed_rps: Vec<f64>,
    mixed_cloud_share: f64,
    requests: usize,
    /// Mixed stream against the agent with telemetry off (same rounds, interleaved).
    mixed_off_rps: Vec<f64>,
    /// Encoded size of the telemetry agent's last report.
    report_bytes: Option<usize>,
    reports_seen: u64,
}

async fn run(
    args: &Args,
    servers: Servers,
    server: &tokio::runtime::Handle,
) -> anyhow::Result<String> {
    let examples = inputs::load_examples(&repo_path("models/eval/examples.toml"))?;
    let edge = Model::load(&repo_path(EDGE_MANIFEST))?;
    let cloud = Model::load(&repo_path(CLOUD_MANIFEST))?;
    let input_name = edge.manifest().input.name.clone();
    let confident = example(&examples, "confident")?;
    let unsure = example(&examples, "unsure")?;

    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = servers.infer_url();
    let confident_body = inputs::infer_body("confident", &input_name, &confident.pixels);
    let unsure_body = inputs::infer_body("unsure", &input_name, &unsure.pixels);
    inproc::wait_for_tier(&client, &url, &unsure_body, "cloud").await?;
    let mut echo = inproc::start_echo(servers.broker_port, server).await?;

    let latency = latency_rounds(
        args, &edge, &cloud, confident, unsure, &client, &url, &mut echo,
    )
    .await?;
    let off_url = servers.infer_url_without_telemetry();
    inproc::wait_for_tier(&client, &off_url, &unsure_body, "cloud").await?;
    let mut tput =
        throughput_rounds(args, &client, &url, &off_url, &confident_body, &input_name).await?;
    // Let one more report go out so the sample covers a busy window.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    if let Some(r) = servers.latest.lock().ok().and_then(|l| l.clone()) {
        tput.report_bytes = tierd_protocol::encode(&r).ok().map(|b| b.len());
        tput.reports_seen = r.seq;
    }
    servers.check_threshold(&client).await?;
    let threshold = servers.threshold;
    echo.stop().await?;
    servers.stop().await?;

    let rss = if args.skip_rss {
        None
    } else {
        eprintln!(
            "memory: edge-agent + cloud-relay subprocesses, {:.0} s of load",
            args.load_seconds
        );
        Some(
            rss::run(
                &examples,
                &input_name,
                Duration::from_secs_f64(args.load_seconds),
                args.concurrency,
            )
            .await?,
        )
    };
    let sizes = sizes::collect()?;
    let signing = signing::run(args.rounds, args.iterations)?;
    Ok(report(args, threshold, &latency, &tput, rss.as_ref(), &sizes) + &signing)
}

#[allow(clippy::too_many_arguments)]
async fn latency_rounds(
    args: &Args,
    edge: &Model,
    cloud: &Model,
    confident: &Example,
    unsure: &Example,
    client: &reqwest::Client,
    url: &str,
    echo: &mut Echo,
) -> anyhow::Result<Latency> {
    let input_name = &edge.manifest().input.name;
    let confident_body = inputs::infer_body("confident", input_name, &confident.pixels);
    let unsure_body = inputs::infer_body("unsure", input_name, &unsure.pixels);
    let confident_input = edge.manifest().wire_input(&to_f32(&confident.pixels));
    let unsure_input = edge.manifest().wire_input(&to_f32(&unsure.pixels));
    let unsure_edge_probs = edge.predict(&unsure_input)?.probabilities;
    let edge_id = edge.id();
    // Request ids seeded from the clock like the agent's, so the varint-encoded id (and with it
    // the payload) has the same size as a real escalation's.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    let next_id = AtomicU64::new(seed);
    let echo_payload_bytes =
        inproc::escalation_payload(seed, &edge_id, &unsure_input, &unsure_edge_probs)?.len();

    eprintln!("warm-up: {} of each side", args.warmup);
    let w = args.warmup;
    inproc::forward_round(edge, &confident_input, w)?;
    inproc::forward_round(cloud, &unsure_input, w)?;
    inproc::http_round(client, url, &confident_body, "edge", w).await?;
    inproc::http_round(client, url, &unsure_body, "cloud", w).await?;
    echo.round(&edge_id, &unsure_input, &unsure_edge_probs, w, &next_id)
        .await?;

    let mut l = Latency {
        forward: Series::default(),
        http_edge: Series::default(),
        echo: Series::default(),
        http_cloud: Series::default(),
        cloud_forward: Series::default(),
        echo_payload_bytes,
    };
    let n = args.iterations;
    for r in 0..args.rounds {
        eprintln!("latency round {}/{}", r + 1, args.rounds);
        // Alternate the order so neither side always runs first (warmer caches, quieter box).
        let order: [usize; 5] = if r % 2 == 0 {
            [0, 1, 2, 3, 4]
        } else {
            [3, 2, 1, 0, 4]
        };
        for side in order {
            match side {
                0 => l
                    .forward
                    .push(inproc::forward_round(edge, &confident_input, n)?),
                1 => l.http_edge.push(
                    inproc::http_round(client, url, &confident_body, "edge", n)
                        .await
                        .context("local path (confident, tier=edge)")?,
                ),
                2 => l.echo.push(
                    echo.round(&edge_id, &unsure_input, &unsure_edge_probs, n, &next_id)
                        .await?,
                ),
                3 => l.http_cloud.push(
                    inproc::http_round(client, url, &unsure_body, "cloud", n)
                        .await
                        .context("escalation (unsure, tier=cloud)")?,
                ),
                _ => l
                    .cloud_forward
                    .push(inproc::forward_round(cloud, &unsure_input, n)?),
            }
        }
    }
    Ok(l)
}

async fn throughput_rounds(
    args: &Args,
    client: &reqwest::Client,
    url: &str,
    off_url: &str,
    confident_body: &bytes::Bytes,
    input_name: &str,
) -> anyhow::Result<Tput> {
    let stream_path = repo_path("models/eval/stream.bin");
    let mut records = stream::read(&stream_path)?;
    if records.len() < args.stream_records {
        bail!(
            "{} has {} records, fewer than --stream-records {}",
            stream_path.display(),
            records.len(),
            args.stream_records
        );
    }
    records.truncate(args.stream_records);
    let mixed: Arc<Vec<Job>> = Arc::new(
        records
            .iter()
            .enumerate()
            .map(|(i, r)| Job {
                body: inputs::infer_body(&i.to_string(), input_name, &r.pixels),
                tier: None,
            })
            .collect(),
    );
    let confident: Arc<Vec<Job>> = Arc::new(vec![
        Job {
            body: confident_body.clone(),
            tier: Some("edge"),
        };
        args.stream_records
    ]);
    let mut t = Tput {
        confident_rps: Vec::new(),
        mixed_rps: Vec::new(),
        mixed_cloud_share: 0.0,
        requests: args.stream_records,
        mixed_off_rps: Vec::new(),
        report_bytes: None,
        reports_seen: 0,
    };
    for r in 0..args.rounds {
        eprintln!("throughput round {}/{}", r + 1, args.rounds);
        for mixed_first in [r % 2 == 1, r % 2 == 0] {
            if mixed_first {
                let m = inproc::throughput(client, url, mixed.clone(), args.concurrency)
                    .await
                    .context("mixed stream")?;
                t.mixed_cloud_share = m.cloud as f64 / m.requests as f64;
                t.mixed_rps.push(m.rps());
            } else {
                let c = inproc::throughput(client, url, confident.clone(), args.concurrency)
                    .await
                    .context("confident-only stream")?;
                t.confident_rps.push(c.rps());
            }
        }
        let off = inproc::throughput(client, off_url, mixed.clone(), args.concurrency)
            .await
            .context("mixed stream, telemetry off")?;
        t.mixed_off_rps.push(off.rps());
    }
    Ok(t)
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn latency_table(
    out: &mut String,
    a_label: &str,
    a: &Series,
    b_label: &str,
    b: &Series,
    ratio_label: &str,
) {
    use std::fmt::Write;
    let (lo, hi) = round_ratio_range(a, b);
    let _ = writeln!(out, "| path | p50 µs | p99 µs | samples |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (label, s) in [(a_label, a), (b_label, b)] {
        let _ = writeln!(
            out,
            "| {label} | {:.1} | {:.1} | {} |",
            s.p50_us(),
            s.p99_us(),
            s.samples()
        );
    }
    let _ = writeln!(
        out,
        "| **{ratio_label}** | **{:.1}x** | **{:.1}x** | per-round p50 ratio {lo:.1}x–{hi:.1}x |",
        b.p50_us() / a.p50_us(),
        b.p99_us() / a.p99_us()
    );
}

fn report(
    args: &Args,
    threshold: f32,
    l: &Latency,
    t: &Tput,
    rss: Option<&rss::RssReport>,
    sizes: &[sizes::Binary],
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<!-- tierd-bench --rounds {} --iterations {} --warmup {} --stream-records {} --concurrency {} --load-seconds {} -->",
        args.rounds, args.iterations, args.warmup, args.stream_records, args.concurrency, args.load_seconds
    );
    let _ = writeln!(
        o,
        "Values are medians over {} interleaved rounds of {} timed samples per side.\n",
        args.rounds, args.iterations
    );
    let _ = writeln!(
        o,
        "Threshold pinned at {threshold} for the whole run: the in-process relay runs with \
         `tuning.push = false` (its tuner proposes, never pushes), and both agents still ran \
         {threshold} at the end (`tierd_threshold` on their /metrics).\n"
    );

    let _ = writeln!(o, "### 1. Local path overhead\n");
    latency_table(
        &mut o,
        "raw tract forward, `Model::predict` (confident)",
        &l.forward,
        "HTTP POST infer → agent → edge model, tier=edge (confident)",
        &l.http_edge,
        "ratio HTTP / raw forward",
    );

    let _ = writeln!(o, "\n### 2. Escalation overhead\n");
    latency_table(
        &mut o,
        &format!(
            "raw MQTT v5 echo via the embedded broker ({} B QoS 0, TCP_NODELAY clients)",
            l.echo_payload_bytes
        ),
        &l.echo,
        "HTTP POST infer → edge → MQTT → relay → cloud model, tier=cloud (unsure)",
        &l.http_cloud,
        "ratio escalated HTTP / MQTT echo",
    );
    let _ = writeln!(
        o,
        "| context: raw cloud forward, `Model::predict` (unsure) | {:.1} | {:.1} | {} |",
        l.cloud_forward.p50_us(),
        l.cloud_forward.p99_us(),
        l.cloud_forward.samples()
    );

    let _ = writeln!(o, "\n### 3. Agent memory while serving\n");
    match rss {
        None => {
            let _ = writeln!(o, "skipped (--skip-rss)");
        }
        Some(r) => {
            let _ = writeln!(
                o,
                "| process | idle after start (VmRSS) | peak under load (VmHWM) | max sampled VmRSS | VmRSS after load |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|---:|");
            let _ = writeln!(
                o,
                "| `edge-agent` | {} | {} | {} | {} |",
                mib(r.agent_idle.rss_kb),
                mib(r.agent_end.hwm_kb),
                mib(r.agent_peak_sampled_kb),
                mib(r.agent_end.rss_kb)
            );
            let _ = writeln!(
                o,
                "| `cloud-relay` + embedded broker (context) | {} | {} | – | {} |",
                mib(r.relay_idle.rss_kb),
                mib(r.relay_end.hwm_kb),
                mib(r.relay_end.rss_kb)
            );
            let _ = writeln!(
                o,
                "\nLoad: {} requests in {:.1} s ({:.0} req/s), {:.0}% escalated, {} in flight; {} RSS samples at 50 ms; binary {}.",
                r.requests,
                r.load_seconds,
                r.requests as f64 / r.load_seconds,
                100.0 * r.cloud as f64 / r.requests.max(1) as f64,
                args.concurrency,
                r.samples,
                r.agent_bin.display()
            );
        }
    }

    let _ = writeln!(o, "\n### 4. Throughput\n");
    let (c, m) = (
        median(t.confident_rps.iter().copied()),
        median(t.mixed_rps.iter().copied()),
    );
    let ratios: Vec<f64> = t
        .confident_rps
        .iter()
        .zip(&t.mixed_rps)
        .map(|(c, m)| c / m)
        .collect();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let _ = writeln!(
        o,
        "| stream ({} requests per round, {} in flight) | req/s | escalated |",
        t.requests, args.concurrency
    );
    let _ = writeln!(o, "|---|---:|---:|");
    let _ = writeln!(o, "| confident only (`confident` example) | {c:.0} | 0% |");
    let _ = writeln!(
        o,
        "| mixed: first {} records of `models/eval/stream.bin` | {m:.0} | {:.1}% |",
        t.requests,
        100.0 * t.mixed_cloud_share
    );
    let _ = writeln!(
        o,
        "| **ratio confident / mixed** | **{:.2}x** | per-round {lo:.2}x–{hi:.2}x |",
        c / m
    );

    let _ = writeln!(o, "\n### 5. Cost of measuring (telemetry on vs off)\n");
    let off = median(t.mixed_off_rps.iter().copied());
    let _ = writeln!(
        o,
        "| agent, mixed stream ({} requests per round) | req/s |",
        t.requests
    );
    let _ = writeln!(o, "|---|---:|");
    let _ = writeln!(
        o,
        "| telemetry off (`telemetry.enabled = false`: counters only) | {off:.0} |"
    );
    let _ = writeln!(
        o,
        "| telemetry on: 6 HDR histograms, energy sampler at 1 Hz, a report every 1 s | {m:.0} |"
    );
    let _ = writeln!(o, "| **ratio on / off** | **{:.3}x** |", m / off);
    match t.report_bytes {
        Some(b) => {
            let _ = writeln!(
                o,
                "\nOne telemetry report: {b} bytes of postcard payload ({} reports sent by the telemetry agent during the run).",
                t.reports_seen
            );
        }
        None => {
            let _ = writeln!(o, "\nNo telemetry report was produced during the run.");
        }
    }

    let _ = writeln!(
        o,
        "\n### 6. Binary sizes (release profile, symbols stripped)\n"
    );
    let _ = writeln!(o, "| binary | bytes | MiB | path | `file -b` |");
    let _ = writeln!(o, "|---|---:|---:|---|---|");
    for b in sizes {
        match b.bytes {
            Some(n) => {
                let _ = writeln!(
                    o,
                    "| {} | {n} | {:.2} | `{}` | {} |",
                    b.label,
                    n as f64 / (1024.0 * 1024.0),
                    b.path.display(),
                    b.file.as_deref().unwrap_or("?")
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "| {} | not built | – | `{}` | – |",
                    b.label,
                    b.path.display()
                );
            }
        }
    }
    o
}

/// Pixels as the wire values a manifest's golden vectors and `wire_input` take.
fn to_f32(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| f32::from(p)).collect()
}

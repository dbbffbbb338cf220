//! `edge-agent`: the daemon (`run`), a model checker (`check-model`) and an energy meter probe
//! (`energy probe`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_agent::config::AgentConfig;
use edge_agent::{shutdown_signal, Agent};
use tierd_runtime::Model;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "tierd edge agent: local inference, escalating unsure requests to the cloud relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Config file (TOML). Without it every key takes its documented default.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load a model from its manifest, verify checksum and golden vectors, print its metadata and
    /// forward latency. Exits non-zero on any problem.
    CheckModel {
        manifest: PathBuf,
        /// Forward passes to time.
        #[arg(long, default_value_t = 1000)]
        runs: usize,
    },
    /// Energy meters (RAPL, INA3221 hwmon, INA219, CPU-time estimate).
    Energy {
        #[command(subcommand)]
        cmd: EnergyCmd,
    },
}

#[derive(Subcommand)]
enum EnergyCmd {
    /// List the detected meters and print one reading per second (watts, joules since start).
    Probe {
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    tierd_runtime::init_logging("info,rumqttd=off");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckModel { manifest, runs } => check_model(&manifest, runs),
        Command::Energy {
            cmd: EnergyCmd::Probe { seconds },
        } => edge_agent::energy::probe(
            &edge_agent::energy::Roots::default(),
            None,
            seconds,
            &mut std::io::stdout().lock(),
        )
        .context("energy probe"),
    };
    tierd_runtime::cli::exit_code("edge-agent", result)
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match config {
        Some(p) => AgentConfig::load(&p)?,
        None => AgentConfig::default(),
    };
    tierd_runtime::cli::block_on(async {
        let agent = Agent::start(config).await?;
        // Start has verified the model (sha256 + golden vectors) and bound the port.
        let addr = agent.local_addr()?;
        tierd_runtime::systemd::ready(&format!("serving on http://{addr}; MQTT connecting"));
        agent
            .serve(async {
                shutdown_signal().await;
                tierd_runtime::systemd::stopping(
                    "stopping: draining requests, sending the last telemetry report",
                );
            })
            .await?;
        Ok(())
    })
}

fn check_model(manifest: &std::path::Path, runs: usize) -> anyhow::Result<()> {
    let model = Model::load(manifest)?;
    let m = model.manifest();
    println!("model      {}", model.id());
    if !m.description.is_empty() {
        println!("about      {}", m.description);
    }
    println!(
        "file       {} ({} bytes, sha256 ok)",
        m.model_path().display(),
        model.file_bytes()
    );
    println!(
        "input      {} {:?} {} (clients send {}; x * {} + {})",
        m.input.name,
        m.input.shape,
        m.input.dtype.as_str(),
        m.preprocess.wire_dtype.as_str(),
        m.preprocess.scale,
        m.preprocess.offset
    );
    println!(
        "output     {} ({} labels: {})",
        m.output.name,
        m.output.labels.len(),
        m.output.labels.join(",")
    );
    println!("golden     {} vectors match", m.golden.len());
    let (mean, p99) = model.time_forward(runs)?;
    println!(
        "forward    mean {:.1} us, p99 {:.1} us over {runs} runs",
        mean.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    Ok(())
}

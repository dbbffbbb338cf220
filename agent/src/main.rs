//! `edge-agent`: the daemon (`run`), a model checker (`check-model`), manifests for any ONNX
//! classifier (`model init`), model-release signing (`model keygen`, `model sign`), an energy
//! meter probe (`energy probe`) and a pre-flight check of a config (`doctor`).

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
        /// Require a signature by this model-release key (`tierd-ed25519:<hex>`); repeatable.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<tierd_protocol::PublicKey>,
    },
    /// Model-release keys and manifest signatures.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Energy meters (RAPL, INA3221 hwmon, INA219, CPU-time estimate).
    Energy {
        #[command(subcommand)]
        cmd: EnergyCmd,
    },
    /// Check what `run` needs, one line per check: config, model, state directory, HTTP port,
    /// broker (a real connect with the configured TLS and credentials), energy meters, clock.
    /// Exits non-zero when a check fails.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for the broker's answer.
        #[arg(long, default_value_t = 10)]
        broker_timeout_s: u64,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Write a manifest for an ONNX classifier: names, shapes and types from the graph, the
    /// sha256, and golden vectors computed here from sample inputs. `check-model` and `run`
    /// accept what it writes.
    Init(edge_agent::model_init::InitOptions),
    /// Create a model-release key pair (PKCS#8, mode 0600; never overwrites) and print its
    /// public key for agents' `[model] trusted_keys`.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a manifest with a model-release key: writes `<manifest>.sig`. Checks the manifest
    /// and its model first (sha256, golden vectors), so only a model that loads is signed.
    Sign {
        manifest: PathBuf,
        /// The private key file (from `edge-agent model keygen`).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum EnergyCmd {
    /// List the detected meters and print one reading per second (watts, joules since start).
    Probe {
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Probe what this agent config selects (`[energy] source`, an `[energy.ina219]`
        /// meter) instead of auto-detection alone.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tierd_runtime::init_logging("info,rumqttd=off");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckModel {
            manifest,
            runs,
            trusted_keys,
        } => check_model(&manifest, runs, &trusted_keys),
        Command::Model {
            cmd: ModelCmd::Keygen { out },
        } => model_keygen(&out),
        Command::Model {
            cmd: ModelCmd::Init(opts),
        } => model_init(&opts),
        Command::Model {
            cmd: ModelCmd::Sign { manifest, key },
        } => model_sign(&manifest, &key),
        Command::Energy {
            cmd: EnergyCmd::Probe { seconds, config },
        } => energy_probe(seconds, config),
        Command::Doctor {
            config,
            broker_timeout_s,
        } => doctor(&config, broker_timeout_s),
    };
    tierd_runtime::cli::exit_code("edge-agent", result)
}

fn energy_probe(seconds: u64, config: Option<PathBuf>) -> anyhow::Result<()> {
    let energy = match config {
        Some(p) => AgentConfig::load(&p)?.energy,
        None => edge_agent::config::EnergyConfig::default(),
    };
    edge_agent::energy::probe(
        &edge_agent::energy::Roots::default(),
        energy.source,
        energy.ina219.as_ref(),
        seconds,
        &mut std::io::stdout().lock(),
    )
    .context("energy probe")
}

fn doctor(config: &std::path::Path, broker_timeout_s: u64) -> anyhow::Result<()> {
    let ok = edge_agent::doctor::run(
        config,
        std::time::Duration::from_secs(broker_timeout_s.max(1)),
        &mut std::io::stdout().lock(),
    )
    .context("writing the report")?;
    anyhow::ensure!(ok, "doctor: some checks failed (the FAIL lines above)");
    Ok(())
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

fn model_init(opts: &edge_agent::model_init::InitOptions) -> anyhow::Result<()> {
    let (m, notes) = edge_agent::model_init::init(opts)?;
    println!("wrote      {}", opts.out.display());
    println!("model      {}", m.id());
    println!(
        "file       {} (sha256 {})",
        m.file.display(),
        &m.sha256[..16]
    );
    print!("{}", describe_io(&m));
    println!(
        "golden     {} vectors (tolerance {}), verified by loading the model as the agent does",
        m.golden.len(),
        opts.tolerance
    );
    for n in notes {
        println!("note       {n}");
    }
    println!(
        "next       edge-agent check-model {}; then [model] manifest = {:?} in agent.toml",
        opts.out.display(),
        opts.out.display().to_string()
    );
    Ok(())
}

fn model_keygen(out: &std::path::Path) -> anyhow::Result<()> {
    let signer = tierd_runtime::keyfile::create(out)?;
    eprintln!(
        "model-release key written to {} (mode 0600; keep it off the devices)",
        out.display()
    );
    println!("{}", signer.public());
    Ok(())
}

fn model_sign(manifest: &std::path::Path, key: &std::path::Path) -> anyhow::Result<()> {
    let signer = tierd_runtime::keyfile::load(key)?;
    let bytes =
        std::fs::read(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{} is not UTF-8", manifest.display()))?;
    // Only a manifest whose model loads and passes its golden vectors is worth signing.
    Model::from_manifest(tierd_runtime::Manifest::from_text(manifest, text)?)?;
    let sig_path = tierd_runtime::signature_path(manifest);
    let tmp = sig_path.with_extension("sig.tmp");
    std::fs::write(&tmp, signer.sign_manifest(&bytes))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &sig_path)
        .with_context(|| format!("cannot write {}", sig_path.display()))?;
    println!(
        "signed {} with key {} -> {}",
        manifest.display(),
        signer.public().key_id(),
        sig_path.display()
    );
    Ok(())
}

fn check_model(
    manifest: &std::path::Path,
    runs: usize,
    trusted_keys: &[tierd_protocol::PublicKey],
) -> anyhow::Result<()> {
    let model = Model::load_trusted(manifest, trusted_keys)?;
    if !trusted_keys.is_empty() {
        println!("signature  ok (a trusted model-release key)");
    }
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
    print!("{}", describe_io(m));
    println!("golden     {} vectors match", m.golden.len());
    let (mean, p99) = model.time_forward(runs)?;
    println!(
        "forward    mean {:.1} us, p99 {:.1} us over {runs} runs",
        mean.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    Ok(())
}

/// The `input`, `output` lines of `check-model` and `model init`.
fn describe_io(m: &tierd_runtime::Manifest) -> String {
    let wire = match &m.preprocess {
        Some(p) => format!(
            "clients send UINT8 (model input = x * {} + {}) or FP32 (the model's input as is)",
            p.scale, p.offset
        ),
        None => "clients send FP32: the model's input as is".into(),
    };
    let kind = match m.output.kind {
        tierd_runtime::OutputKind::Probabilities => "probabilities",
        tierd_runtime::OutputKind::Logits => "logits, softmaxed before confidence",
    };
    format!(
        "input      {} {:?} {} ({wire})\noutput     {}: {kind} ({} labels: {})\n",
        m.input.name,
        m.input.shape,
        m.input.dtype.as_str(),
        m.output.name,
        m.output.labels.len(),
        m.output.labels.join(",")
    )
}

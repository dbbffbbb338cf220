//! `cloud-relay`: answers escalations with the cloud model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_relay::config::RelayConfig;
use cloud_relay::Relay;

#[derive(Parser)]
#[command(
    name = "cloud-relay",
    version,
    about = "tierd cloud relay: answers escalations with the bigger model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay. Without `[mqtt]` in the config it embeds a broker.
    Run {
        /// Config file (TOML). Without it every key takes its documented default.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tierd_runtime::init_logging("info,rumqttd=off");
    let Cli { command } = Cli::parse();
    let result = match command {
        Command::Run { config } => run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match config {
        Some(p) => RelayConfig::load(&p)?,
        None => RelayConfig::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let relay = Relay::start(config).await?;
        // Start has verified the model, started the embedded broker if any, bound the API.
        tierd_runtime::systemd::ready(&format!(
            "API on http://{}; MQTT connecting",
            relay.http_addr()
        ));
        relay
            .serve(async {
                tierd_runtime::shutdown_signal().await;
                tierd_runtime::systemd::stopping("stopping: finishing escalations in progress");
            })
            .await;
        anyhow::Ok(())
    })
}

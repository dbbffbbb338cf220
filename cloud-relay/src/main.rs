//! `cloud-relay`: answers escalations with the cloud model (`run`); operator commands over the
//! running relay's HTTP API (`config show|set|reset`, `report`, `devices`, `rollout`);
//! `keygen` for the config-signing key; `decode` for payloads seen on the broker.

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
    /// Show or change a device's remote config (through the running relay's HTTP API).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Create the config-signing key if there is none (never overwrites one), and print its
    /// public key: what agents pin in `[remote_config] trusted_keys`.
    Keygen {
        /// Put the key in this state directory (`config-signing-key.pk8`). Default: the one
        /// `--config` names (or its `signing_key`), else the relay's default state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print only the public key (`tierd-ed25519:…`), for scripts.
        #[arg(long)]
        print_public: bool,
    },
    /// Roll a new version of an edge model out to devices: shadow-tested on their live
    /// traffic, promoted or rolled back by the numbers (through the running relay's HTTP API).
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// The fleet as a table: each device's state, model, threshold, traffic and tier mix
    /// (through the running relay's HTTP API).
    Devices {
        #[command(flatten)]
        api: Api,
        /// Print the API's JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print tierd MQTT payloads as JSON, one object per line. Reads lines of
    /// `mosquitto_sub -t 'tierd/#' -F '%t %x'` (topic and hex payload) from stdin; with `--raw`,
    /// one payload's raw bytes (`mosquitto_sub -C 1 -N -t TOPIC`). Signatures are not checked.
    Decode {
        /// Stdin is one payload's raw bytes, not lines of hex.
        #[arg(long)]
        raw: bool,
        /// The topic the raw payload came from (cross-checks its kind).
        #[arg(long)]
        topic: Option<String>,
    },
    /// The cost report: per device and for the fleet, money, energy and CO2 against
    /// all-cloud and all-edge baselines from the same traffic.
    Report {
        #[command(flatten)]
        api: Api,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct Api {
    /// Base URL of the relay's HTTP API (its `http.listen`).
    #[arg(long, default_value = "http://127.0.0.1:9100", env = "TIERD_RELAY_API")]
    api: String,
    /// File holding the API's bearer token (the relay's `http.token_file`). Otherwise
    /// `$TIERD_RELAY_TOKEN`, else the token the relay generated in its state directory.
    #[arg(long, env = "TIERD_RELAY_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The relay's state directory, where it generated its token (`http-token`) when no
    /// `http.token_file` is configured. Default: `$STATE_DIRECTORY`, else
    /// `tierd-relay-state`, else /var/lib/tierd-relay (the systemd unit's).
    #[arg(long, env = "TIERD_RELAY_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl Api {
    /// The token to send: `--token-file`, `$TIERD_RELAY_TOKEN`, then the generated one in the
    /// state directory. None when nothing is found (the relay will answer 401 and say why).
    fn token(&self) -> anyhow::Result<Option<String>> {
        use cloud_relay::http_auth::{read_token, TOKEN_FILE_NAME};
        if let Some(f) = &self.token_file {
            return Ok(Some(read_token(f)?));
        }
        if let Ok(t) = std::env::var("TIERD_RELAY_TOKEN") {
            let t = t.trim();
            if !t.is_empty() {
                return Ok(Some(t.to_owned()));
            }
        }
        if let Some(d) = &self.state_dir {
            let f = d.join(TOKEN_FILE_NAME);
            anyhow::ensure!(
                f.exists(),
                "no {TOKEN_FILE_NAME} in --state-dir {}",
                d.display()
            );
            return Ok(Some(read_token(&f)?));
        }
        for d in [
            tierd_runtime::state::state_directory(None, "tierd-relay-state"),
            PathBuf::from("/var/lib/tierd-relay"),
        ] {
            let f = d.join(TOKEN_FILE_NAME);
            if f.exists() {
                return Ok(Some(read_token(&f)?));
            }
        }
        Ok(None)
    }
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Start a rollout of the candidate whose manifest (signed: `<manifest>.sig` beside it)
    /// and ONNX file are given.
    Start {
        /// The candidate's manifest; its `.sig` and the ONNX file it names are read beside it.
        #[arg(long)]
        manifest: PathBuf,
        /// Names the rollout (default: the candidate's `name-version`).
        #[arg(long)]
        id: Option<String>,
        /// Devices in the rollout, comma-separated (default: every device whose model has the
        /// candidate's name).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// The first wave's devices, comma-separated.
        #[arg(long, value_delimiter = ',')]
        canary: Vec<String>,
        /// Share of the remaining devices in the second wave, percent (0: the rest at once).
        #[arg(long, default_value_t = 0)]
        percent: u8,
        /// Share of live requests the candidate shadows, (0, 1].
        #[arg(long, default_value_t = 0.1)]
        shadow_rate: f64,
        #[command(flatten)]
        api: Api,
    },
    /// Every rollout, or one with each device's stage and evidence.
    Status {
        id: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Stop deciding and starting waves (evidence keeps accumulating).
    Pause {
        id: String,
        #[command(flatten)]
        api: Api,
    },
    Resume {
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Roll every device back, promoted ones included.
    Abort {
        id: String,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The device's document in force, overrides, and the device's last ack.
    Show {
        #[arg(long)]
        device: String,
        #[command(flatten)]
        api: Api,
    },
    /// Set operator overrides (`key=value`; `key=` unsets) and publish the new document.
    /// Keys: threshold (pins it), signal, audit_rate, escalation_timeout_ms,
    /// telemetry_interval_s.
    Set {
        #[arg(long)]
        device: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Configure a device this relay has never heard of (before its first connect);
        /// without it an unknown id is refused, so a typo does not persist a config line.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Start a new config epoch for the device: versions start over and the device takes the
    /// new document even if its version in force is ahead (recovers a device whose version
    /// reached its end).
    Reset {
        #[arg(long)]
        device: String,
        #[command(flatten)]
        api: Api,
    },
}

fn main() -> ExitCode {
    tierd_runtime::init_logging("info,rumqttd=off");
    let Cli { command } = Cli::parse();
    let result = match command {
        Command::Run { config } => run(config),
        Command::Config {
            cmd: ConfigCmd::Show { device, api },
        } => call(
            &api,
            reqwest::Method::GET,
            &format!("/api/devices/{device}/config"),
            None,
        )
        .map(|out| println!("{out}")),
        Command::Config {
            cmd:
                ConfigCmd::Set {
                    device,
                    pairs,
                    force,
                    api,
                },
        } => config_set(&api, &device, &pairs, force),
        Command::Config {
            cmd: ConfigCmd::Reset { device, api },
        } => call(
            &api,
            reqwest::Method::POST,
            &format!("/api/devices/{device}/config/reset"),
            None,
        )
        .map(|out| println!("{out}")),
        Command::Keygen {
            state_dir,
            config,
            print_public,
        } => keygen(state_dir, config, print_public),
        Command::Rollout { cmd } => rollout(cmd),
        Command::Devices { api, json } => devices(&api, json),
        Command::Decode { raw, topic } => decode(raw, topic.as_deref()),
        Command::Report { api, json } => {
            let path = if json {
                "/api/report"
            } else {
                "/api/report?format=text"
            };
            call(&api, reqwest::Method::GET, path, None).map(|out| println!("{out}"))
        }
    };
    tierd_runtime::cli::exit_code("cloud-relay", result)
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match config {
        Some(p) => RelayConfig::load(&p)?,
        None => RelayConfig::default(),
    };
    tierd_runtime::cli::block_on(async {
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

fn keygen(
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    print_public: bool,
) -> anyhow::Result<()> {
    let path = match (state_dir, config) {
        (Some(dir), _) => dir.join(cloud_relay::signing::KEY_FILE),
        (None, Some(c)) => RelayConfig::load(&c)?.signing_key_path(),
        (None, None) => RelayConfig::default().signing_key_path(),
    };
    let (signer, created) = cloud_relay::signing::load_or_create(&path)?;
    if print_public {
        println!("{}", signer.public());
    } else {
        let what = if created { "created" } else { "exists" };
        println!(
            "config-signing key {what}: {}\npublic key (key id {}), for every agent's [remote_config] trusted_keys:\n{}",
            path.display(),
            signer.public().key_id(),
            signer.public()
        );
    }
    Ok(())
}

fn rollout(cmd: RolloutCmd) -> anyhow::Result<()> {
    let (api, method, path, body) = match cmd {
        RolloutCmd::Start {
            manifest,
            id,
            devices,
            canary,
            percent,
            shadow_rate,
            api,
        } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("cannot read {}", manifest.display()))?;
            let sig_path = tierd_runtime::signature_path(&manifest);
            let signature = std::fs::read_to_string(&sig_path).with_context(|| {
                format!(
                    "cannot read {} (sign the manifest with `edge-agent model sign`)",
                    sig_path.display()
                )
            })?;
            let m = tierd_runtime::Manifest::from_text(&manifest, &text)?;
            let onnx_path = m.model_path();
            let onnx = std::fs::read(&onnx_path)
                .with_context(|| format!("cannot read {}", onnx_path.display()))?;
            let id = id.unwrap_or_else(|| format!("{}-{}", m.name, m.version));
            let body = serde_json::json!({
                "id": id,
                "manifest": text,
                "signature": signature,
                "onnx_hex": hex::encode(&onnx),
                "devices": devices,
                "canary": canary,
                "percent": percent,
                "shadow_rate": shadow_rate,
            });
            (
                api,
                reqwest::Method::POST,
                "/api/rollouts".to_string(),
                Some(body),
            )
        }
        RolloutCmd::Status { id, api } => (
            api,
            reqwest::Method::GET,
            id.map_or_else(
                || "/api/rollouts".into(),
                |id| format!("/api/rollouts/{id}"),
            ),
            None,
        ),
        RolloutCmd::Pause { id, api } => (
            api,
            reqwest::Method::POST,
            format!("/api/rollouts/{id}/pause"),
            None,
        ),
        RolloutCmd::Resume { id, api } => (
            api,
            reqwest::Method::POST,
            format!("/api/rollouts/{id}/resume"),
            None,
        ),
        RolloutCmd::Abort { id, api } => (
            api,
            reqwest::Method::POST,
            format!("/api/rollouts/{id}/abort"),
            None,
        ),
    };
    println!("{}", call(&api, method, &path, body)?);
    Ok(())
}

fn config_set(api: &Api, device: &str, pairs: &[String], force: bool) -> anyhow::Result<()> {
    let mut body = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{p:?} is not key=value"))?;
        body.insert(
            k.trim().to_string(),
            serde_json::Value::String(v.to_string()),
        );
    }
    let out = call(
        api,
        reqwest::Method::PUT,
        &format!(
            "/api/devices/{device}/config{}",
            if force { "?force=true" } else { "" }
        ),
        Some(serde_json::Value::Object(body)),
    )?;
    println!("{out}");
    Ok(())
}

fn devices(api: &Api, json: bool) -> anyhow::Result<()> {
    let text = call(api, reqwest::Method::GET, "/api/devices", None)?;
    if json {
        println!("{text}");
        return Ok(());
    }
    let body: serde_json::Value =
        serde_json::from_str(&text).context("the relay's /api/devices is not JSON")?;
    print!(
        "{}",
        cloud_relay::fleet_table::render(&body, tierd_runtime::unix_ms())
    );
    Ok(())
}

/// One payload as a JSON line on `out`; false when it did not decode (the line says why).
fn print_decoded(
    out: &mut dyn std::io::Write,
    topic: Option<&str>,
    payload: &[u8],
) -> anyhow::Result<bool> {
    let (line, ok) = match tierd_protocol::inspect::to_json(topic, payload) {
        Ok(v) => (v, true),
        Err(e) => (
            serde_json::json!({ "topic": topic, "error": e.to_string(), "bytes": payload.len() }),
            false,
        ),
    };
    writeln!(out, "{line}").context("stdout")?;
    Ok(ok)
}

fn decode(raw: bool, topic: Option<&str>) -> anyhow::Result<()> {
    use std::io::{BufRead, Read, Write};
    let mut out = std::io::stdout().lock();
    if raw {
        let mut payload = Vec::new();
        std::io::stdin()
            .lock()
            .take(1 << 20)
            .read_to_end(&mut payload)
            .context("reading stdin")?;
        anyhow::ensure!(
            print_decoded(&mut out, topic, &payload)?,
            "the payload does not decode"
        );
        return Ok(());
    }
    let mut failed = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let decoded = match tierd_protocol::inspect::parse_hex_line(&line) {
            None => continue,
            Some(Ok((t, payload))) => print_decoded(&mut out, t.or(topic), &payload)?,
            Some(Err(why)) => {
                writeln!(out, "{}", serde_json::json!({ "error": why })).context("stdout")?;
                false
            }
        };
        failed += u64::from(!decoded);
        out.flush().context("stdout")?;
    }
    anyhow::ensure!(failed == 0, "{failed} payloads did not decode");
    Ok(())
}

/// One request to the relay's API; the body comes back pretty-printed when it is JSON. A
/// non-2xx answer is an error carrying the relay's message.
fn call(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<String> {
    let url = format!("{}{path}", api.api.trim_end_matches('/'));
    let token = api.token()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("HTTP client")?;
        let mut req = client.request(method, &url);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the relay at {url} (is it running? --api)"))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        let pretty = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok());
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            if status == reqwest::StatusCode::UNAUTHORIZED && token.is_none() {
                anyhow::bail!(
                    "{url}: {status}: {msg}\n(no token found: pass --token-file or --state-dir)"
                );
            }
            anyhow::bail!("{url}: {status}: {msg}");
        }
        Ok(pretty.unwrap_or(text))
    })
}

//! What an operator runs and reads, with real processes: `edge-agent doctor` against a real
//! Mosquitto with TLS and passwords (a refused port, a CA that did not sign the broker and a
//! wrong password each get their own line), `cloud-relay config set` refusing a device id it has
//! never seen unless `--force`, `cloud-relay devices`, `cloud-relay decode` on payloads taken off
//! the broker, two boards claiming one device id, and logs without escape codes or the embedded
//! broker's noise when `RUST_LOG=info` is set as the systemd unit sets it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tierd_e2e::{
    bin_path, chmod, confident_examples, daemon_command, edge_manifest, free_port,
    start_mosquitto_conf, AgentOptions, AgentProc, Pki, Proc, RelayBroker, RelayProc,
    READY_TIMEOUT, RELAY_READY,
};

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Runs a CLI to its end (with a timeout) and returns its output.
fn run_cli(binary: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = daemon_command(binary);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the CLI");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{binary} {args:?} did not finish within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `broker` line of a doctor run on `agent_toml`, and whether doctor succeeded.
fn doctor_broker_line(agent_toml: &Path) -> (bool, String) {
    let out = run_cli(
        "edge-agent",
        &[
            "doctor",
            "--config",
            agent_toml.to_str().expect("utf-8 path"),
            "--broker-timeout-s",
            "10",
        ],
        None,
    );
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains(" broker "))
        .unwrap_or_else(|| panic!("no broker line in:\n{all}"))
        .to_string();
    (out.status.success(), line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_a_refused_broker_a_bad_ca_and_a_wrong_password_each_in_its_own_words() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new_ca(&dir.path().join("pki"), "ca");
    let (crt, key) = pki.broker("broker", "IP:127.0.0.1,DNS:localhost");
    let other = Pki::new_ca(&dir.path().join("other"), "ca");
    // A password file made with the broker's own tool, as an operator would.
    let passwd = dir.path().join("pki/passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["pi-7", "right-password"])
        .output();
    let made = match made {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("mosquitto_passwd failed: {}", text(&o)),
        Err(e) => {
            assert!(
                std::env::var("TIERD_SKIP_MOSQUITTO").as_deref() == Ok("1"),
                "mosquitto_passwd (package mosquitto) is not installed: {e}"
            );
            false
        }
    };
    if !made {
        return;
    }
    for f in [&crt, &key, &passwd, &pki.ca_file()] {
        chmod(f, 0o644);
    }
    chmod(&dir.path().join("pki"), 0o755);
    chmod(dir.path(), 0o755);
    let port = free_port();
    let conf = format!(
        "per_listener_settings false\nallow_anonymous false\npassword_file {}\n\
         listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        passwd.display(),
        pki.ca_file().display(),
        crt.display(),
        key.display()
    );
    let Some(_broker) = start_mosquitto_conf(port, &conf).await else {
        return;
    };
    let state = dir.path().join("state");
    let config = |name: &str, port: u16, ca: &Path, password: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        let http = free_port();
        std::fs::write(
            &p,
            format!(
                "device_id = \"pi-7\"\nstate_dir = {}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
                 [model]\nmanifest = {}\n\
                 [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nca_file = {}\n\
                 username = \"pi-7\"\npassword = \"{password}\"\n",
                q(&state),
                q(&edge_manifest()),
                q(ca),
            ),
        )
        .expect("write agent.toml");
        p
    };

    let (ok, line) = doctor_broker_line(&config("good", port, &pki.ca_file(), "right-password"));
    assert!(ok && line.starts_with("ok    broker"), "{line}");
    assert!(line.contains("over TLS") && line.contains("pi-7"), "{line}");

    let closed = free_port();
    let (ok, refused) =
        doctor_broker_line(&config("refused", closed, &pki.ca_file(), "right-password"));
    assert!(!ok, "doctor must fail on a refused broker");
    assert!(
        refused.starts_with("FAIL  broker") && refused.contains("nothing accepts connections"),
        "{refused}"
    );

    let (ok, bad_ca) =
        doctor_broker_line(&config("bad-ca", port, &other.ca_file(), "right-password"));
    assert!(!ok, "doctor must fail on a CA that did not sign the broker");
    assert!(
        bad_ca.contains("not signed by our ca_file"),
        "bad CA line: {bad_ca}"
    );

    let (ok, bad_password) =
        doctor_broker_line(&config("bad-password", port, &pki.ca_file(), "wrong"));
    assert!(!ok, "doctor must fail on a wrong password");
    assert!(
        bad_password.contains("refused our credentials"),
        "wrong password line: {bad_password}"
    );
    // Three different causes, three different lines.
    assert!(refused != bad_ca && bad_ca != bad_password && refused != bad_password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_cli_lists_devices_refuses_unknown_ids_and_decodes_the_wire() {
    let relay = RelayProc::start("relay-ops", RelayBroker::Embedded).await;
    let agent =
        AgentProc::start(AgentOptions::new("pi-7", relay.broker_port).telemetry_interval_s(0.2))
            .await;
    for ex in confident_examples().iter().cycle().take(5) {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("edge", "a confident digit");
    }
    relay
        .wait_device("pi-7", "5 requests", |d| {
            d["latest"]["totals"]["edge"].as_u64() >= Some(5)
        })
        .await;
    let api = format!("http://127.0.0.1:{}", relay.http_port);
    let token = relay.token_file.to_str().expect("utf-8 path").to_owned();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api", &api, "--token-file", &token]);
        run_cli("cloud-relay", &all, None)
    };

    // devices: a table with the device online, its model and counts.
    let out = cli(&["devices"]);
    let table = text(&out);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("pi-7 "))
        .unwrap_or_else(|| panic!("no pi-7 row:\n{table}"));
    assert!(
        row.contains("online") && row.contains("digits-edge@"),
        "{row}"
    );
    assert!(table
        .lines()
        .next()
        .unwrap_or_default()
        .starts_with("DEVICE"));

    // config set: a typo is refused and nothing is persisted; --force configures ahead.
    let out = cli(&["config", "set", "--device", "pi-77", "audit_rate=0.05"]);
    let refused = text(&out);
    assert!(!out.status.success(), "a typo must be refused: {refused}");
    assert!(
        refused.contains("never been seen") && refused.contains("pi-7"),
        "names the problem and suggests the known id: {refused}"
    );
    let (_, view) = relay.get_json("/api/devices/pi-77/config").await;
    assert!(
        view["published"].is_null() && view["operator_overrides"]["audit_rate"].is_null(),
        "nothing persisted for the typo: {view}"
    );
    let out = cli(&[
        "config",
        "set",
        "--device",
        "pi-77",
        "--force",
        "audit_rate=0.05",
    ]);
    assert!(out.status.success(), "--force: {}", text(&out));
    let out = cli(&["config", "set", "--device", "pi-7", "audit_rate=0.05"]);
    assert!(out.status.success(), "a known device: {}", text(&out));

    // decode: what a subscriber to tierd/# sees (retained status and config, telemetry), as
    // `mosquitto_sub -F '%t %x'` prints it, piped into `cloud-relay decode`.
    let mut o = MqttOptions::new("ops-sniffer", "127.0.0.1", relay.broker_port);
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    client
        .subscribe("tierd/v1/pi-7/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let mut lines = String::new();
    let mut topics = std::collections::BTreeSet::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    while !(topics.contains("status") && topics.contains("telemetry") && topics.contains("config"))
    {
        assert!(Instant::now() < deadline, "saw only {topics:?}");
        let ev = tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
            .await
            .expect("broker event");
        if let Ok(Event::Incoming(Packet::Publish(p))) = ev {
            let t = String::from_utf8_lossy(&p.topic).to_string();
            topics.insert(t.rsplit('/').next().unwrap_or_default().to_string());
            lines.push_str(&format!("{t} {}\n", hex::encode(&p.payload)));
        }
        // A request now and then keeps telemetry flowing.
        if !topics.contains("telemetry") {
            agent.infer(&confident_examples()[0].pixels).await;
        }
    }
    lines.push_str("not-hex-at-all zz\n");
    let out = run_cli("cloud-relay", &["decode"], Some(lines.as_bytes()));
    let decoded = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success(),
        "one bad line makes the exit code non-zero"
    );
    let objects: Vec<serde_json::Value> = decoded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let kind = |k: &str| objects.iter().find(|v| v["kind"] == k);
    let status = kind("device status").unwrap_or_else(|| panic!("no status in {decoded}"));
    assert_eq!(status["device"], "pi-7");
    assert_eq!(status["message"]["online"], true);
    let spooled = kind("spooled record").unwrap_or_else(|| panic!("no telemetry in {decoded}"));
    assert!(
        spooled["message"]["body"]["device_id"] == "pi-7"
            || spooled["message"]["body"]["version"].is_u64(),
        "{spooled}"
    );
    let config = kind("signed config document").unwrap_or_else(|| panic!("no config in {decoded}"));
    assert_eq!(config["message"]["signature"], "not checked");
    assert!(
        objects.iter().all(|v| v.get("warning").is_none()),
        "{decoded}"
    );
    assert!(
        objects
            .last()
            .is_some_and(|v| v["error"].as_str().is_some_and(|e| e.contains("not hex"))),
        "{decoded}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boards_claiming_one_device_id_are_reported() {
    let relay = RelayProc::start("relay-clones", RelayBroker::Embedded).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ids = [
        "1111aaaa1111aaaa1111aaaa1111aaaa",
        "2222bbbb2222bbbb2222bbbb2222bbbb",
    ];
    let mut agents = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let f = dir.path().join(format!("machine-id-{i}"));
        std::fs::write(&f, format!("{id}\n")).expect("write machine id");
        // Distinct client ids: two boards from one image still differ there (a broker would
        // otherwise kick one off, which is a different symptom).
        let opts = AgentOptions::new("cam-1", relay.broker_port)
            .env("TIERD_MACHINE_ID_FILE", f.to_str().expect("utf-8"))
            .mqtt(&format!("client_id = \"cam-1-board-{i}\""));
        agents.push(AgentProc::start(opts).await);
    }
    let mut relay = relay;
    relay
        .proc
        .wait_for_log("two machines claim device id \"cam-1\"", READY_TIMEOUT)
        .await;
    let (_, m) = relay.get_text("/metrics").await;
    let n: f64 = m
        .lines()
        .find(|l| l.starts_with("tierd_fleet_device_id_collisions_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no collision counter in:\n{m}"));
    assert!(n >= 1.0, "{n}");
    let (_, view) = relay.get_json("/api/devices/cam-1").await;
    assert!(
        view["status"]["id_collisions"].as_u64() >= Some(1),
        "{view:#}"
    );
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_have_no_escape_codes_and_keep_the_builtin_filters_under_rust_log_info() {
    // As the systemd units run the daemons: RUST_LOG=info, stderr not a terminal, NO_COLOR
    // unset.
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let http = free_port();
    let relay_toml = dir.path().join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "state_dir = \"state\"\n[model]\nmanifest = {}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [embedded_broker]\nlisten = \"127.0.0.1:{port}\"\n",
            q(&tierd_e2e::cloud_manifest())
        ),
    )
    .expect("write relay.toml");
    let mut cmd = Command::new(bin_path("cloud-relay"));
    cmd.args(["run", "--config"])
        .arg(&relay_toml)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    let mut relay = Proc::spawn("cloud-relay", cmd, &dir.path().join("relay.log"));
    relay.wait_for_log(RELAY_READY, READY_TIMEOUT).await;
    // A client connects and goes away without a DISCONNECT: an ordinary event in the field,
    // which rumqttd logs as an ERROR unless its built-in `rumqttd=off` survives RUST_LOG.
    {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("ops-dropper", "127.0.0.1", port), 8);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(Event::Incoming(Packet::ConnAck(_))) = eventloop.poll().await {
                    break;
                }
            }
        })
        .await;
        drop(client);
        drop(eventloop);
    }
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "device_id = \"pi-9\"\nstate_dir = \"agent-state\"\n[http]\nlisten = \"127.0.0.1:{}\"\n\
             [model]\nmanifest = {}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n",
            free_port(),
            q(&edge_manifest())
        ),
    )
    .expect("write agent.toml");
    let mut cmd = Command::new(bin_path("edge-agent"));
    cmd.args(["run", "--config"])
        .arg(&agent_toml)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    let mut agent = Proc::spawn("edge-agent", cmd, &dir.path().join("agent.log"));
    agent
        .wait_for_log("connected to MQTT broker", READY_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.terminate(Duration::from_secs(10));
    relay.terminate(Duration::from_secs(10));
    for (name, log) in [("relay", relay.log()), ("agent", agent.log())] {
        assert!(
            !log.contains('\u{1b}'),
            "{name} log has ANSI escapes:\n{log}"
        );
        assert!(
            !log.contains("ERROR"),
            "{name} log has an ERROR line:\n{log}"
        );
        assert!(
            !log.contains("rumqttd::"),
            "{name} log has the embedded broker's own lines:\n{log}"
        );
    }
    let relay_log = relay.log();
    assert_eq!(
        relay_log.matches(RELAY_READY).count(),
        1,
        "one readiness line per connect:\n{relay_log}"
    );
}

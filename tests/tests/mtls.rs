//! Mutual TLS and the role ACL end to end, on Mosquitto with the shipped config
//! (`cross/mosquitto/`): certificates made at test time with the openssl CLI, the real
//! `cloud-relay` and `edge-agent` binaries, and a foreign rumqttc client as the attacker.
//!
//! Needs Mosquitto and openssl; fails without Mosquitto unless `TIERD_SKIP_MOSQUITTO=1`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tempfile::TempDir;
use tierd_e2e::{
    assert_probs_close, free_port, start_mosquitto, start_mosquitto_shipped, top1, unsure_examples,
    AgentOptions, AgentProc, Mosquitto, Pki, RelayBroker, RelayProc,
};
use tierd_runtime::mqtt::MqttConfig;
use tokio::sync::mpsc;

const TOL: f32 = 1e-4;
const CONNECT_FAILED: &str = "MQTT connect failed: ";

/// The fleet PKI of one test: CA `ca`, broker, relay and device certificates, and a second CA
/// (`other/`) with device certificates of its own.
struct Fleet {
    dir: TempDir,
    pki: Pki,
    other: Pki,
}

impl Fleet {
    fn new(devices: &[&str]) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("tierd-mtls-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki::new_ca(dir.path(), "ca");
        pki.broker("broker", "IP:127.0.0.1,DNS:localhost");
        pki.client("relay", "tierd-relay");
        let other = Pki::new_ca(&dir.path().join("other"), "ca");
        for d in devices {
            pki.client(d, d);
            other.client(d, d);
        }
        Fleet { dir, pki, other }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[mqtt]` keys for TLS with the fleet CA and, if given, the client certificate
    /// `{dir}/{stem}.crt` and its key.
    fn mqtt_keys(&self, cert: Option<(&Path, &str)>) -> String {
        let mut keys = format!("ca_file = {}\n", q(&self.pki.ca_file()));
        if let Some((dir, stem)) = cert {
            keys.push_str(&format!(
                "client_cert_file = {}\nclient_key_file = {}\n",
                q(&dir.join(format!("{stem}.crt"))),
                q(&dir.join(format!("{stem}.key")))
            ));
        }
        keys
    }

    fn device_keys(&self, stem: &str) -> String {
        self.mqtt_keys(Some((self.dir.path(), stem)))
    }

    /// The same settings as an in-process client config (for the attacker).
    fn client_config(&self, port: u16, stem: &str) -> MqttConfig {
        MqttConfig {
            port,
            ca_file: Some(self.pki.ca_file()),
            client_cert_file: Some(self.path(&format!("{stem}.crt"))),
            client_key_file: Some(self.path(&format!("{stem}.key"))),
            ..MqttConfig::default()
        }
    }

    async fn mosquitto(&self) -> Option<Mosquitto> {
        // The shipped config wants ca.crt, broker.crt and broker.key: the names used here.
        start_mosquitto_shipped(free_port(), self.dir.path()).await
    }

    async fn relay(&self, id: &str, port: u16) -> RelayProc {
        let keys = self.mqtt_keys(Some((self.dir.path(), "relay")));
        RelayProc::start_with_mqtt(id, port, &keys, "").await
    }
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A foreign MQTT client: every packet it receives, or the error that ended its connection.
struct Attacker {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
}

impl Attacker {
    fn spawn(cfg: &MqttConfig, id: &str) -> Attacker {
        let opts = cfg.options(id).expect("attacker options");
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Attacker { client, events }
    }

    /// Connects and waits for CONNACK.
    async fn connect(cfg: &MqttConfig, id: &str) -> Attacker {
        let mut a = Attacker::spawn(cfg, id);
        match a.next(|p| matches!(p, Packet::ConnAck(_))).await {
            Some(Ok(_)) => a,
            other => panic!("attacker {id} did not connect: {other:?}"),
        }
    }

    /// The next packet matching `want` within 10 s (other packets are skipped), or the error
    /// that closed the connection; `None` on timeout.
    async fn next(&mut self, want: impl Fn(&Packet) -> bool) -> Option<Result<Packet, String>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) | Ok(None) => return None,
                Ok(Some(Ok(p))) if !want(&p) => continue,
                Ok(Some(r)) => return Some(r),
            }
        }
    }

    /// Subscribes and returns the broker's reason code.
    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("attacker subscribe");
        match self.next(|p| matches!(p, Packet::SubAck(_))).await {
            Some(Ok(Packet::SubAck(s))) => s.return_codes[0],
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason code (Debug text), or what ended it.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> String {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("attacker publish");
        match self.next(|p| matches!(p, Packet::PubAck(_))).await {
            Some(Ok(Packet::PubAck(a))) => format!("{:?}", a.reason),
            other => format!("{other:?}"),
        }
    }

    /// The topics of every PUBLISH received so far.
    fn received_topics(&mut self) -> Vec<String> {
        let mut topics = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            if let Ok(Packet::Publish(p)) = ev {
                topics.push(String::from_utf8_lossy(&p.topic).into_owned());
            }
        }
        topics
    }
}

/// Answers every unsure example through `agent` and asserts each came from the cloud model.
async fn assert_cloud_answers(agent: &AgentProc, what: &str) {
    for ex in unsure_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("cloud", &format!("{what}: {}", ex.name));
        assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, TOL, &ex.name);
        assert_eq!(top1(&r.probabilities()), top1(&ex.cloud_probabilities));
    }
}

/// Asserts the agent answers unsure inputs with its own model, marked as a fallback.
async fn assert_fallback_answers(agent: &AgentProc, what: &str) {
    for ex in unsure_examples().iter().take(3) {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("edge_fallback", &format!("{what}: {}", ex.name));
        assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
    }
}

/// Waits (bounded) for the agent's connect-failure WARN line and returns it; asserts it is the
/// only one so far (rate limited) and, if `why` is not empty, that it names one of `why`.
async fn connect_failure_line(agent: &AgentProc, why: &[&str], what: &str) -> String {
    let start = Instant::now();
    let line = loop {
        let log = agent.proc.log();
        if let Some(l) = log.lines().find(|l| l.contains(CONNECT_FAILED)) {
            break l.to_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: no {CONNECT_FAILED:?} line; log:\n{}",
            agent.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{what}: {line}");
    assert!(line.contains("WARN"), "{what}: not a WARN line: {line}");
    let lower = line.to_lowercase();
    assert!(
        why.is_empty() || why.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{what}: the line does not say why ({why:?}): {line}"
    );
    let count = agent
        .proc
        .log()
        .lines()
        .filter(|l| l.contains(CONNECT_FAILED))
        .count();
    assert_eq!(count, 1, "{what}: rate limit: one line in the first 30 s");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signed_agents_escalate_and_bad_certificates_fall_back_with_one_warning() {
    let fleet = Fleet::new(&["mtls-ok", "mtls-cn"]);
    let Some(mut mosquitto) = fleet.mosquitto().await else {
        return;
    };
    let relay = fleet.relay("mtls-r1", mosquitto.port).await;
    mosquitto.wait_for_suback("cloud-relay-mtls-r1").await;

    // A CA-signed device escalates and gets the cloud's answers.
    let ok = AgentProc::start(
        AgentOptions::new("mtls-ok", mosquitto.port).mqtt(&fleet.device_keys("mtls-ok")),
    )
    .await;
    assert_cloud_answers(&ok, "CA-signed device").await;

    // No client certificate: the broker ends the handshake.
    let nocert = AgentProc::start(
        AgentOptions::new("mtls-nocert", mosquitto.port)
            .mqtt(&fleet.mqtt_keys(None))
            .escalation_timeout_ms(300)
            .without_broker(),
    )
    .await;
    connect_failure_line(
        &nocert,
        &["requires a client certificate"],
        "no client certificate",
    )
    .await;
    assert_fallback_answers(&nocert, "no client certificate").await;

    // A certificate from another CA.
    let other = AgentProc::start(
        AgentOptions::new("mtls-ok", mosquitto.port)
            .mqtt(&fleet.mqtt_keys(Some((&fleet.other.dir, "mtls-ok"))))
            .escalation_timeout_ms(300)
            .without_broker(),
    )
    .await;
    connect_failure_line(
        &other,
        &[
            "does not trust our client certificate",
            "rejected our client certificate",
        ],
        "certificate from another CA",
    )
    .await;
    assert_fallback_answers(&other, "certificate from another CA").await;

    // The broker's certificate does not name the address the agent dialled.
    let (crt, key) = fleet.pki.broker("broker-wrong", "DNS:wrong.example");
    let wrong_dir = fleet.path("wrong-name");
    std::fs::create_dir_all(&wrong_dir).expect("mkdir");
    std::fs::copy(fleet.pki.ca_file(), wrong_dir.join("ca.crt")).expect("copy");
    std::fs::copy(crt, wrong_dir.join("broker.crt")).expect("copy");
    std::fs::copy(key, wrong_dir.join("broker.key")).expect("copy");
    let Some(wrong_broker) = start_mosquitto_shipped(free_port(), &wrong_dir).await else {
        return;
    };
    let mismatch = AgentProc::start(
        AgentOptions::new("mtls-ok", wrong_broker.port)
            .mqtt(&fleet.device_keys("mtls-ok"))
            .escalation_timeout_ms(300)
            .without_broker(),
    )
    .await;
    connect_failure_line(&mismatch, &["server name mismatch"], "server name mismatch").await;
    assert_fallback_answers(&mismatch, "server name mismatch").await;

    // device_id differs from the certificate's CN: the ACL gives it nothing under that id.
    let cn = AgentProc::start(
        AgentOptions::new("mtls-cn-x", mosquitto.port)
            .mqtt(&fleet.device_keys("mtls-cn"))
            .escalation_timeout_ms(300)
            .without_broker(),
    )
    .await;
    assert_fallback_answers(&cn, "device_id is not the certificate's CN").await;
    let resp = relay
        .put_config("mtls-cn-x", r#"{"threshold": 0.42}"#)
        .await;
    assert!(resp.status().is_success(), "PUT config: {}", resp.status());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !cn.proc.log().contains("remote config applied"),
        "a device with another CN got a config:\n{}",
        cn.proc.log_tail(30)
    );
    assert_fallback_answers(&cn, "device_id is not the certificate's CN, after a push").await;
    eprintln!(
        "CN mismatch agent's WARN lines:\n{}",
        cn.proc
            .log()
            .lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The good device was never disturbed.
    assert_cloud_answers(&ok, "CA-signed device, at the end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_refuses_what_a_stolen_device_certificate_tries() {
    let fleet = Fleet::new(&["acl-a", "acl-b"]);
    let Some(mut mosquitto) = fleet.mosquitto().await else {
        return;
    };
    let port = mosquitto.port;
    let _relay = fleet.relay("acl-r1", port).await;
    mosquitto.wait_for_suback("cloud-relay-acl-r1").await;
    let a =
        AgentProc::start(AgentOptions::new("acl-a", port).mqtt(&fleet.device_keys("acl-a"))).await;
    let b =
        AgentProc::start(AgentOptions::new("acl-b", port).mqtt(&fleet.device_keys("acl-b"))).await;
    mosquitto.wait_for_suback("edge-agent-acl-a").await;
    mosquitto.wait_for_suback("edge-agent-acl-b").await;
    let version_before = a.metric("tierd_config_version", "").await;

    // The attacker holds device a's certificate and key.
    let cfg = fleet.client_config(port, "acl-a");
    let mut thief = Attacker::connect(&cfg, "thief").await;

    // 1. A retained config on a's own config topic (threshold 0.01: never escalate).
    let doc = serde_json::json!({"version": 999, "threshold": 0.01}).to_string();
    let puback = thief
        .publish("tierd/v1/acl-a/config", doc.into_bytes(), true)
        .await;
    eprintln!("retained config on its own config topic: PUBACK {puback}");
    assert!(!puback.contains("Success"), "the broker took it: {puback}");

    // 2. Read everything and read b's escalations. Mosquitto 2.0's acl_file does not check
    //    SUBSCRIBE (every SUBACK says granted, `deny` included); it checks `read` at delivery, so
    //    nothing may arrive.
    for filter in ["#", "tierd/v1/+/escalate/+", "tierd/v1/acl-b/escalate/+"] {
        let code = thief.subscribe(filter).await;
        eprintln!("SUBSCRIBE {filter}: {code:?}");
    }
    // 3. A forged reply to b.
    let forged = thief
        .publish("tierd/v1/acl-b/reply", b"{}".to_vec(), false)
        .await;
    eprintln!("forged reply to another device: PUBACK {forged}");
    assert!(!forged.contains("Success"), "the broker took it: {forged}");
    // 4. Forged evidence and status for another device, a config for it, a spool ack to it.
    for (topic, retain) in [
        ("tierd/v1/acl-b/telemetry", false),
        ("tierd/v1/acl-b/status", true),
        ("tierd/v1/acl-b/config", true),
        ("tierd/v1/acl-b/ack", false),
    ] {
        let puback = thief.publish(topic, b"forged".to_vec(), retain).await;
        eprintln!("forged {topic}: PUBACK {puback}");
        assert!(
            !puback.contains("Success"),
            "the broker took {topic}: {puback}"
        );
    }

    // Every escalation is still answered by the real relay with the cloud model; the thief
    // read none of them.
    for round in 0..3 {
        assert_cloud_answers(&b, &format!("device b under attack, round {round}")).await;
        assert_cloud_answers(&a, &format!("device a (stolen certificate), round {round}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It may read what device a itself may read (its certificate is stolen), nothing else.
    let leaked: Vec<String> = thief
        .received_topics()
        .into_iter()
        .filter(|t| is_escalation(t) || t.contains("acl-b"))
        .collect();
    assert!(leaked.is_empty(), "the thief read: {leaked:?}");

    // 5. Join the relays' shared group. The broker admits it (see above) and then drops the
    //    share of escalations it assigns to the thief, because the thief may not read them: a
    //    stolen device certificate can delay escalations (they fall back to the edge's answer
    //    after the timeout, SECURITY.md) but never read or answer one.
    for filter in [
        "$share/tierd-relay/tierd/v1/+/escalate/+",
        "$share/tierd-relay.digits-edge/tierd/v1/+/escalate/digits-edge",
        "$share/tierd-relay/#",
    ] {
        let code = thief.subscribe(filter).await;
        eprintln!("SUBSCRIBE {filter}: {code:?}");
    }
    let (mut cloud, mut fallback) = (0, 0);
    for ex in unsure_examples() {
        let r = b.infer(&ex.pixels).await;
        match r.tier() {
            "cloud" => {
                cloud += 1;
                assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, TOL, &ex.name);
            }
            "edge_fallback" => {
                fallback += 1;
                assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
            }
            other => panic!("{}: tier {other} while the thief is in the group", ex.name),
        }
    }
    eprintln!("thief in the shared group: {cloud} cloud answers, {fallback} edge fallbacks");
    assert!(cloud > 0, "the real relay answered none");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leaked: Vec<String> = thief
        .received_topics()
        .into_iter()
        .filter(|t| is_escalation(t) || t.contains("acl-b"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the thief read through the group: {leaked:?}"
    );
    assert!(!a.proc.log().contains("remote config applied"));
    assert_eq!(a.metric("tierd_config_version", "").await, version_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_client_cannot_connect_to_the_tls_listener() {
    let fleet = Fleet::new(&["anon-dev"]);
    let Some(mosquitto) = fleet.mosquitto().await else {
        return;
    };
    let plain = MqttConfig {
        port: mosquitto.port,
        ..MqttConfig::default()
    };
    let mut anon = Attacker::spawn(&plain, "anonymous");
    let first = anon.next(|_| true).await;
    eprintln!("anonymous plain-TCP client: {first:?}");
    assert!(
        !matches!(first, Some(Ok(Packet::ConnAck(_)))),
        "an anonymous plain-TCP client got a CONNACK"
    );
    // TLS without a client certificate is refused too.
    let no_cert = MqttConfig {
        port: mosquitto.port,
        ca_file: Some(fleet.pki.ca_file()),
        ..MqttConfig::default()
    };
    let mut anon_tls = Attacker::spawn(&no_cert, "anonymous-tls");
    let first = anon_tls.next(|_| true).await;
    eprintln!("TLS client without a certificate: {first:?}");
    assert!(
        !matches!(first, Some(Ok(Packet::ConnAck(_)))),
        "a TLS client without a certificate got a CONNACK"
    );
}

/// Escalation latency through Mosquitto with mutual TLS and with plain TCP, side by side,
/// requests alternating between the two so both see the same machine load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_latency_with_and_without_tls() {
    let fleet = Fleet::new(&["lat-tls"]);
    let Some(mut tls_broker) = fleet.mosquitto().await else {
        return;
    };
    let Some(mut plain_broker) = start_mosquitto(free_port()).await else {
        return;
    };
    let _r_tls = fleet.relay("lat-r-tls", tls_broker.port).await;
    let _r_plain = RelayProc::start("lat-r-plain", RelayBroker::External(plain_broker.port)).await;
    tls_broker.wait_for_suback("cloud-relay-lat-r-tls").await;
    plain_broker
        .wait_for_suback("cloud-relay-lat-r-plain")
        .await;
    let tls = AgentProc::start(
        AgentOptions::new("lat-tls", tls_broker.port).mqtt(&fleet.device_keys("lat-tls")),
    )
    .await;
    let plain = AgentProc::start(AgentOptions::new("lat-plain", plain_broker.port)).await;
    let unsure = unsure_examples();
    let (warmup, rounds) = (10, 200);
    let (mut t_tls, mut t_plain) = (Vec::new(), Vec::new());
    for i in 0..warmup + rounds {
        let ex = &unsure[i % unsure.len()];
        for (agent, times) in [(&tls, &mut t_tls), (&plain, &mut t_plain)] {
            let r = agent.infer(&ex.pixels).await;
            r.assert_ok_from("cloud", &ex.name);
            if i >= warmup {
                times.push(r.elapsed);
            }
        }
    }
    let ms = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
    };
    eprintln!(
        "escalation (HTTP request answered tier=cloud) via Mosquitto 2.0, {rounds} sequential \
         requests each, debug build:\n\
         | transport | p50 ms | p95 ms |\n|---|---|---|\n\
         | plain TCP | {:.2} | {:.2} |\n| mutual TLS | {:.2} | {:.2} |",
        ms(&mut t_plain, 0.5),
        ms(&mut t_plain, 0.95),
        ms(&mut t_tls, 0.5),
        ms(&mut t_tls, 0.95)
    );
}

/// An escalation request's topic (`tierd/v1/{device}/escalate/{model}`).
fn is_escalation(topic: &str) -> bool {
    topic.contains("/escalate/")
}

//! Your own models, end to end on the real binaries: a relay whose cloud model is served by a
//! real Open Inference Protocol server that tierd did not write (MLServer + onnxruntime), the
//! agent falling back while that server is dead and using it again once it is back; an edge
//! model whose output is logits escalating on its softmax confidence; and the README's
//! walkthrough (a stock skl2onnx export, `edge-agent model init`, the stock tritonclient);
//! several models on one agent, each escalating to its own pool and each with its own evidence,
//! certificate and tuned threshold at the relay.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tierd_e2e::{
    assert_probs_close, bin_path, breast_rows, cloud_manifest, repo_root, unsure_examples,
    AgentOptions, AgentProc, OipServer, RelayBroker, RelayProc,
};
use tierd_runtime::Model;

const TIMEOUT_MS: u64 = 800;

fn models(p: &str) -> PathBuf {
    repo_root().join("models").join(p)
}

/// The agent answered with its own model because the relay answered with an error.
fn assert_relay_error_fallback(r: &tierd_e2e::InferResult, what: &str) {
    r.assert_ok_from("edge_fallback", what);
    assert_eq!(
        r.fallback_reason(),
        Some("relay_error:internal"),
        "{what}: {}",
        r.body
    );
}

/// Runs `binary run --config config` (in the config's folder), which must exit non-zero at
/// start; returns its stderr.
fn refused_at_start(binary: &str, config: &std::path::Path) -> String {
    let out = Command::new(bin_path(binary))
        .args(["run", "--config"])
        .arg(config)
        .current_dir(config.parent().expect("a folder"))
        .output()
        .unwrap_or_else(|e| panic!("{binary} runs: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{binary} started: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalations_go_through_a_real_oip_server_and_fall_back_while_it_is_down() {
    let mut server = OipServer::start(
        &models("cloud/digits-cloud.onnx"),
        "digits-cloud",
        "probabilities",
    )
    .await;
    let relay = RelayProc::start_with(
        "oip-relay",
        RelayBroker::Embedded,
        &format!(
            "[model.oip]\nurl = \"{}\"\ntimeout_ms = 500\nconcurrency = 4\n",
            server.url()
        ),
    )
    .await;
    assert!(
        relay
            .proc
            .log()
            .contains("OIP server answers the golden vectors"),
        "{}",
        relay.proc.log_tail(20)
    );
    let agent = AgentProc::start(
        AgentOptions::new("oip-dev", relay.broker_port).escalation_timeout_ms(TIMEOUT_MS),
    )
    .await;
    let unsure = unsure_examples();

    // Through MLServer: the cloud model's answer, as tract would give it.
    for ex in &unsure {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("cloud", &ex.name);
        assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, 1e-4, &ex.name);
    }

    // The server hangs (SIGSTOP: connections accepted, nothing answered): the relay's
    // [model.oip] timeout (500 ms) answers with an error, so the agent falls back before its own.
    let pid = server.proc.pid().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let r = agent.infer(&unsure[0].pixels).await;
    signal("-CONT");
    assert_relay_error_fallback(&r, "with the OIP server hung");
    assert!(
        r.elapsed >= Duration::from_millis(450) && r.elapsed < Duration::from_millis(TIMEOUT_MS),
        "fell back after {:?}, not at the relay's 500 ms timeout",
        r.elapsed
    );
    assert!(relay.proc.log().contains("did not answer within 500 ms"));

    // The server dies: every escalation falls back within the timeout, none fails.
    server.kill();
    for ex in &unsure {
        let r = agent.infer(&ex.pixels).await;
        assert_relay_error_fallback(&r, &format!("{} with the OIP server dead", ex.name));
        assert!(
            r.elapsed < Duration::from_millis(TIMEOUT_MS + 300),
            "fell back after {:?}",
            r.elapsed
        );
    }
    assert!(
        relay.proc.log().contains("unreachable"),
        "the relay says why: {}",
        relay.proc.log_tail(20)
    );

    // Back up on the same port: escalations reach it again (a pooled connection to the dead
    // server may cost one more fallback).
    server.restart().await;
    let start = Instant::now();
    let ex = &unsure[0];
    loop {
        let r = agent.infer(&ex.pixels).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.tier() == "cloud" {
            assert_probs_close(
                &r.probabilities(),
                &ex.cloud_probabilities,
                1e-4,
                "after restart",
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no cloud answer 10 s after the OIP server came back: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_an_oip_server_that_serves_another_model() {
    // MLServer serves the edge model under the cloud model's name: the golden vectors differ.
    let server = OipServer::start(
        &models("edge/digits-edge.onnx"),
        "digits-cloud",
        "probabilities",
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nmanifest = {:?}\n[model.oip]\nurl = \"{}\"\n[embedded_broker]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            cloud_manifest().display().to_string(),
            server.url(),
            tierd_e2e::free_port()
        ),
    )
    .expect("write");
    let stderr = refused_at_start("cloud-relay", &config);
    assert!(
        stderr.contains("does not serve the model this manifest describes"),
        "{stderr}"
    );
}

fn fp32_body(row: &[f32]) -> serde_json::Value {
    json!({ "inputs": [{ "name": "input", "shape": [1, row.len()], "datatype": "FP32", "data": row }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logits_edge_model_escalates_when_its_softmax_confidence_is_low() {
    let edge_manifest = models("edge/breast-edge.toml");
    let edge = Model::load(&edge_manifest).expect("edge");
    let cloud = Model::load(&models("cloud/breast-cloud.toml")).expect("cloud");
    assert_eq!(
        edge.manifest().output.kind,
        tierd_runtime::OutputKind::Logits
    );
    let relay = RelayProc::start_serving(
        "logits-relay",
        RelayBroker::Embedded,
        &models("cloud/breast-cloud.toml"),
        &[],
        "",
    )
    .await;
    let agent = AgentProc::start(
        AgentOptions::new("logits-dev", relay.broker_port)
            .model(&edge_manifest, Vec::new())
            .threshold(Some(0.9)),
    )
    .await;
    let rows = breast_rows();
    let (mut unsure, mut sure) = (0, 0);
    for row in rows.iter().take(200) {
        let input = edge.manifest().wire_input(row);
        let local = edge.predict(&input).expect("edge").probabilities;
        let conf = local.iter().copied().fold(0.0f32, f32::max);
        if (conf - 0.9).abs() < 1e-3 {
            continue; // too close to the threshold to call
        }
        let r = agent
            .post_json("/v2/models/breast-edge/infer", &fp32_body(row))
            .await;
        let p = r.probabilities();
        assert!(
            (p.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "softmaxed: {p:?}"
        );
        if conf < 0.9 {
            // Raw logits would have read as confidence ~1.4 and never escalated.
            r.assert_ok_from("cloud", "softmax confidence under 0.9");
            let want = cloud.predict(&input).expect("cloud").probabilities;
            assert_probs_close(&p, &want, 1e-4, "cloud answer");
            unsure += 1;
        } else {
            r.assert_ok_from("edge", "softmax confidence over 0.9");
            assert_probs_close(&p, &local, 1e-5, "edge answer");
            assert!(
                (r.confidence() - f64::from(conf)).abs() < 1e-4,
                "{}",
                r.body
            );
            sure += 1;
        }
    }
    assert!(unsure >= 10 && sure >= 10, "unsure {unsure}, sure {sure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_skl2onnx_export_goes_through_model_init_and_answers_tritonclient() {
    let dir = tempfile::tempdir().expect("dir");
    let script = repo_root().join("tests/clients/own_model.py");
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{what} failed:\n{text}");
        text
    };
    run(
        Command::new("python3")
            .arg(&script)
            .arg("export")
            .arg(dir.path()),
        "export",
    );
    let manifest = dir.path().join("iris.toml");
    let init = run(
        Command::new(bin_path("edge-agent"))
            .args(["model", "init"])
            .arg(dir.path().join("iris.onnx"))
            .arg("--samples")
            .arg(dir.path().join("iris-samples.npy"))
            .arg("--out")
            .arg(&manifest)
            .args(["--labels", "setosa,versicolor,virginica"]),
        "model init",
    );
    assert!(init.contains("probabilities"), "{init}");
    let check = run(
        Command::new(bin_path("edge-agent"))
            .arg("check-model")
            .arg(&manifest)
            .args(["--runs", "10"]),
        "check-model",
    );
    assert!(check.contains("golden     5 vectors match"), "{check}");
    let agent = AgentProc::start(
        AgentOptions::new("iris-dev", tierd_e2e::free_port())
            .without_broker()
            .model(&manifest, Vec::new()),
    )
    .await;
    let out = run(
        Command::new("python3")
            .arg(&script)
            .arg("query")
            .arg(format!("127.0.0.1:{}", agent.http_port))
            .arg(dir.path()),
        "tritonclient",
    );
    assert!(out.contains("rows match scikit-learn"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_serves_two_models_each_escalating_to_its_own_pool() {
    // Pool "digits" embeds the broker; pool "breast" joins it. Each serves one edge model.
    let digits_pool = RelayProc::start_serving(
        "multi-digits",
        RelayBroker::Embedded,
        &cloud_manifest(),
        &["digits-edge"],
        "",
    )
    .await;
    let breast_pool = RelayProc::start_serving(
        "multi-breast",
        RelayBroker::External(digits_pool.broker_port),
        &models("cloud/breast-cloud.toml"),
        &["breast-edge"],
        "",
    )
    .await;
    let agent = AgentProc::start(
        AgentOptions::new("multi-dev", digits_pool.broker_port).extra(&format!(
            "[[models]]\nmanifest = {:?}\nthreshold = 0.9\n",
            models("edge/breast-edge.toml").display().to_string()
        )),
    )
    .await;

    // The repository and per-model metadata, as in the Open Inference Protocol.
    let (status, index) = agent.get("/v2/repository/index").await;
    assert_eq!(status, 200, "{index}");
    let names: Vec<(&str, &str, &str)> = index
        .as_array()
        .expect("array")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or(""),
                m["version"].as_str().unwrap_or(""),
                m["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("digits-edge", "2.0.0", "READY"),
            ("breast-edge", "1.0.0", "READY")
        ]
    );
    let (status, meta) = agent.get("/v2/models/breast-edge/versions/1.0.0").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["inputs"][0]["datatype"], "FP32");
    assert_eq!(meta["inputs"][0]["shape"], json!([1, 30]));
    assert_eq!(meta["outputs"][0]["shape"], json!([1, 2]));
    let (status, meta) = agent.get("/v2/models/digits-edge").await;
    assert_eq!(
        (status, &meta["inputs"][0]["datatype"]),
        (200, &json!("UINT8"))
    );
    let (status, err) = agent.get("/v2/models/breast-edge/versions/9").await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = agent.get("/v2/models/nope").await;
    assert_eq!(status, 404);
    assert!(err.to_string().contains("breast-edge"), "{err}");

    // Each model escalates to its own pool and gets its own cloud model's answer.
    for ex in unsure_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("cloud", &ex.name);
        assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, 1e-4, &ex.name);
    }
    let edge = Model::load(&models("edge/breast-edge.toml")).expect("edge");
    let cloud = Model::load(&models("cloud/breast-cloud.toml")).expect("cloud");
    let (mut escalated, mut local) = (0, 0);
    for row in breast_rows().iter().take(60) {
        let input = edge.manifest().wire_input(row);
        let conf = edge
            .predict(&input)
            .expect("edge")
            .probabilities
            .iter()
            .copied()
            .fold(0.0f32, f32::max);
        if (conf - 0.9).abs() < 1e-3 {
            continue;
        }
        let r = agent
            .post_json("/v2/models/breast-edge/infer", &fp32_body(row))
            .await;
        if conf < 0.9 {
            r.assert_ok_from("cloud", "breast escalation");
            let want = cloud.predict(&input).expect("cloud").probabilities;
            assert_probs_close(&r.probabilities(), &want, 1e-4, "breast-cloud's answer");
            escalated += 1;
        } else {
            r.assert_ok_from("edge", "breast local");
            local += 1;
        }
    }
    assert!(
        escalated > 0 && local > 0,
        "{escalated} escalated, {local} local"
    );
    // The digits pool never saw a breast-cancer escalation, and the other way round.
    for (pool, foreign) in [(&digits_pool, "breast-edge"), (&breast_pool, "digits-edge")] {
        let log = pool.proc.log();
        assert!(
            !log.contains(foreign),
            "{} saw {foreign}:\n{log}",
            pool.relay_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_further_model_gets_its_own_certificate_and_tuned_threshold() {
    // One relay pool serving the breast model only, with the default tuning; the agent's
    // primary (digits) has no pool, so nothing may tune it.
    let relay = RelayProc::start_serving(
        "tune-breast",
        RelayBroker::Embedded,
        &models("cloud/breast-cloud.toml"),
        &["breast-edge"],
        "",
    )
    .await;
    let mut agent = AgentProc::start(
        AgentOptions::new("tune-dev", relay.broker_port)
            .telemetry_interval_s(0.5)
            .extra(&format!(
                "[[models]]\nmanifest = {:?}\nthreshold = 1.01\n",
                models("edge/breast-edge.toml").display().to_string()
            )),
    )
    .await;
    // breast-edge ships no offline certificate and starts escalating everything: every
    // request is labelled by the cloud model, the evidence of an online certificate.
    // (The push may land while they are sent: the tier is checked after it.)
    let rows = breast_rows();
    for row in rows.iter().take(1_500) {
        let r = agent
            .post_json("/v2/models/breast-edge/infer", &fp32_body(row))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let threshold = |v: &serde_json::Value| {
        v["published"]["settings"]["models"]["breast-edge"]["threshold"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let view = relay
        .wait_device_config("tune-dev", "breast-edge's tuned threshold applied", |v| {
            v["published"]["source"] == "tuner"
                && v["last_ack"]["applied"] == true
                && v["last_ack"]["version"] == v["published"]["version"]
                && threshold(v) < 1.0
        })
        .await;
    let t = threshold(&view) as f32;
    let cert = &view["published"]["certificate"];
    assert_eq!(cert["model"], "breast-edge@1.0.0", "{cert:#}");
    assert_eq!(cert["basis"], "online", "{cert:#}");
    assert!(
        cert["agreement_lower_bound"].as_f64().expect("bound") >= 0.99,
        "{cert:#}"
    );
    // The primary's threshold is not this pool's to set.
    assert!(
        view["published"]["settings"]["threshold"].is_null(),
        "{view:#}"
    );
    agent
        .proc
        .wait_for_log(
            "remote config applied to a further model",
            Duration::from_secs(30),
        )
        .await;

    // The relay holds the two models' evidence apart; the breast model's next windows run
    // the pushed threshold.
    let device = relay
        .wait_device(
            "tune-dev",
            "breast-edge running the pushed threshold",
            |d| d["models"]["breast-edge"]["running"].as_f64() == Some(f64::from(t)),
        )
        .await;
    let breast = &device["models"]["breast-edge"];
    assert_eq!(breast["model"], "breast-edge@1.0.0", "{breast:#}");
    assert!(
        breast["requests"].as_u64().expect("requests") >= 1_000,
        "{breast:#}"
    );
    assert_eq!(device["calibration"]["model"], "digits-edge@2.0.0");
    assert_eq!(device["calibration"]["requests"], 0, "{device:#}");
    let (_, metrics) = relay.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tierd_device_proposed_threshold")
                && l.contains("model=\"breast-edge\"")),
        "{metrics}"
    );

    // In force on the agent: a row the edge is sure of beyond the threshold stays local,
    // one below it still escalates.
    let edge = Model::load(&models("edge/breast-edge.toml")).expect("edge");
    let (mut local, mut escalated) = (0, 0);
    for row in rows.iter().skip(1_500).take(200) {
        let conf = edge
            .predict(&edge.manifest().wire_input(row))
            .expect("edge")
            .probabilities
            .iter()
            .copied()
            .fold(0.0f32, f32::max);
        if (conf - t).abs() < 1e-3 {
            continue;
        }
        let r = agent
            .post_json("/v2/models/breast-edge/infer", &fp32_body(row))
            .await;
        if conf < t {
            r.assert_ok_from("cloud", "below the pushed threshold");
            escalated += 1;
        } else {
            r.assert_ok_from("edge", "above the pushed threshold");
            local += 1;
        }
    }
    assert!(
        local > 0 && escalated > 0,
        "{local} local, {escalated} escalated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_with_one_name_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[model]\nmanifest = {m:?}\n[[models]]\nmanifest = {m:?}\n",
            m = models("edge/digits-edge.toml").display().to_string()
        ),
    )
    .expect("write");
    let stderr = refused_at_start("edge-agent", &config);
    assert!(stderr.contains("already served"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_on_another_models_topic_is_refused_and_named() {
    // A client that sends a breast-edge request on the digits-edge topic (to reach a pool that
    // does not serve its model, or to slip past `model.serves`) gets a BadRequest, logged.
    let relay = RelayProc::start_serving(
        "cross-topic",
        RelayBroker::Embedded,
        &cloud_manifest(),
        &["digits-edge"],
        "",
    )
    .await;
    let client = tierd_e2e::TestClient::connect(relay.broker_port, "cross-topic-client").await;
    let req = tierd_protocol::EscalationRequest {
        request_id: 7,
        kind: tierd_protocol::EscalationKind::Escalation,
        edge_model: "breast-edge@1.0.0".into(),
        deadline_ms: 1000,
        input: tierd_protocol::Tensor {
            shape: vec![1, 64],
            data: tierd_protocol::TensorData::U8(vec![0; 64]),
        },
        edge_probabilities: vec![0.5, 0.5],
    };
    let payload = tierd_protocol::encode(&req).expect("encode");
    client
        .publish("tierd/v1/intruder/escalate/digits-edge", payload, false)
        .await;
    let start = Instant::now();
    let needle =
        "the topic is for edge model \"digits-edge\" but the request is from \"breast-edge@1.0.0\"";
    while !relay.proc.log().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the relay did not refuse it by name:\n{}",
            relay.proc.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

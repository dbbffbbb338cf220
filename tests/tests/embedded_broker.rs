//! The zero-setup deployment: a relay with its embedded rumqttd broker and an agent joining it.

use std::sync::Arc;
use std::time::Duration;

use tierd_e2e::{
    assert_concurrent_cloud_answers, assert_probs_close, cloud_manifest, confident_examples,
    free_port, top1, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc, EDGE_MODEL,
};
use tierd_protocol::{Tensor, TensorData};
use tierd_runtime::Model;

const TOL: f32 = 1e-4;

async fn relay_and_agent(name: &str) -> (RelayProc, AgentProc) {
    let relay = RelayProc::start(&format!("{name}-relay"), RelayBroker::Embedded).await;
    let agent = AgentProc::start(AgentOptions::new(name, relay.broker_port)).await;
    (relay, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confident_inputs_are_answered_by_the_edge() {
    let (_relay, agent) = relay_and_agent("emb-confident").await;
    for ex in confident_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("edge", &ex.name);
        assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
        let threshold = r.body["parameters"]["threshold"].as_f64().unwrap();
        assert!((threshold - 0.9).abs() < 1e-6, "{}", r.body);
        assert!(
            r.confidence() >= threshold,
            "{}: edge answered with confidence {} below the threshold {threshold}",
            ex.name,
            r.confidence()
        );
        assert_eq!(r.body["parameters"]["label"], ex.label.to_string());
        assert!(r.fallback_reason().is_none(), "{}", r.body);
        assert_eq!(r.body["model_name"], EDGE_MODEL);
        assert_eq!(r.body["outputs"][0]["shape"], serde_json::json!([1, 10]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsure_inputs_are_answered_by_the_cloud_model() {
    let (_relay, agent) = relay_and_agent("emb-unsure").await;
    // The same model the relay runs, loaded here: the agent must return exactly its answer.
    let cloud = Model::load(&cloud_manifest()).expect("cloud model loads");
    for ex in unsure_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("cloud", &ex.name);
        let got = r.probabilities();
        assert_probs_close(&got, &ex.cloud_probabilities, TOL, &ex.name);
        let direct = cloud
            .predict(&Tensor {
                shape: vec![1, 64],
                data: TensorData::U8(ex.pixels.clone()),
            })
            .expect("cloud model predicts")
            .probabilities;
        assert_probs_close(&got, &direct, TOL, &format!("{} vs local cloud", ex.name));
        // The point of escalating: the edge was wrong, the cloud answer is right.
        assert_eq!(top1(&got), ex.label, "{}: cloud top-1", ex.name);
        assert_ne!(top1(&ex.edge_probabilities), ex.label, "{}", ex.name);
        assert_eq!(r.body["parameters"]["label"], ex.label.to_string());
        // The reported confidence is the edge's, which is why it escalated.
        assert!(r.confidence() < 0.9, "{}", r.body);
        assert!(r.body["parameters"]["escalation_us"].as_u64().is_some());
        assert!(r.fallback_reason().is_none(), "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_escalations_each_get_their_own_answer() {
    let (_relay, agent) = relay_and_agent("emb-concurrent").await;
    let agent = Arc::new(agent);
    assert_concurrent_cloud_answers(&agent, 50, TOL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_relay_unsure_inputs_fall_back_to_the_edge() {
    // Nothing listens on this port: the agent never gets an MQTT session.
    let nowhere = free_port();
    let timeout_ms = 300;
    let agent = AgentProc::start(
        AgentOptions::new("emb-no-relay", nowhere)
            .escalation_timeout_ms(timeout_ms)
            .without_broker(),
    )
    .await;
    for ex in unsure_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("edge_fallback", &ex.name);
        let reason = r
            .fallback_reason()
            .unwrap_or_else(|| panic!("{}: no fallback_reason in {}", ex.name, r.body));
        assert_eq!(
            reason, "disconnected",
            "{}: never connected, so the agent should not even wait",
            ex.name
        );
        assert!(
            r.elapsed < Duration::from_millis(timeout_ms) + Duration::from_millis(1700),
            "{}: fallback took {:?}",
            ex.name,
            r.elapsed
        );
        assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
    }
    // Confident inputs are unaffected.
    let ex = &confident_examples()[0];
    let r = agent.infer(&ex.pixels).await;
    r.assert_ok_from("edge", &ex.name);
    assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_health() {
    let (_relay, agent) = relay_and_agent("emb-metadata").await;

    let (status, body) = agent.get("/v2/health/live").await;
    assert_eq!(
        (status, &body["live"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );
    let (status, body) = agent.get("/v2/health/ready").await;
    assert_eq!(
        (status, &body["ready"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );

    let (status, m) = agent.get(&format!("/v2/models/{EDGE_MODEL}")).await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["name"], EDGE_MODEL);
    assert_eq!(m["versions"], serde_json::json!(["2.0.0"]));
    assert_eq!(m["inputs"][0]["name"], "input");
    assert_eq!(m["inputs"][0]["datatype"], "UINT8");
    assert_eq!(m["inputs"][0]["shape"], serde_json::json!([1, 64]));
    assert_eq!(m["outputs"][0]["datatype"], "FP32");
    assert_eq!(m["outputs"][0]["shape"], serde_json::json!([1, 10]));

    let (status, body) = agent
        .get(&format!("/v2/models/{EDGE_MODEL}/versions/2.0.0"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], EDGE_MODEL);
    let (status, body) = agent.get(&format!("/v2/models/{EDGE_MODEL}/ready")).await;
    assert_eq!(
        (status, &body["ready"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );
    let (status, body) = agent.get("/v2/models/nope").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("nope"),
        "{body}"
    );

    let (status, body) = agent.get("/v2").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["extensions"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x == "binary_tensor_data")),
        "{body}"
    );
}

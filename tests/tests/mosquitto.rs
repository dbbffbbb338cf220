//! The production layout: Mosquitto as the broker, relays and agents joining it via `[mqtt]`.
//!
//! These tests need Mosquitto (`apt-get install mosquitto`); they fail without it unless
//! `TIERD_SKIP_MOSQUITTO=1`.

use std::sync::Arc;
use std::time::Duration;

use tierd_e2e::{
    assert_concurrent_cloud_answers, assert_probs_close, confident_examples, free_port,
    start_mosquitto, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc,
};

const TOL: f32 = 1e-4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_mosquitto_answers_then_agent_falls_back_when_it_dies() {
    let Some(mut mosquitto) = start_mosquitto(free_port()).await else {
        return;
    };
    let mut relay = RelayProc::start("mq-r1", RelayBroker::External(mosquitto.port)).await;
    mosquitto.wait_for_suback("cloud-relay-mq-r1").await;
    let timeout_ms = 300;
    let agent = AgentProc::start(
        AgentOptions::new("mq-dev-1", mosquitto.port).escalation_timeout_ms(timeout_ms),
    )
    .await;
    mosquitto.wait_for_suback("edge-agent-mq-dev-1").await;

    let unsure = unsure_examples();
    for ex in &unsure {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("cloud", &ex.name);
        assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, TOL, &ex.name);
    }

    // The relay crashes; Mosquitto and the agent's session stay up, so escalations go nowhere.
    relay.kill();
    for ex in &unsure {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("edge_fallback", &ex.name);
        assert_eq!(r.fallback_reason(), Some("timeout"), "{}", r.body);
        assert!(
            r.elapsed >= Duration::from_millis(timeout_ms),
            "{}: answered after {:?}, before the escalation timeout",
            ex.name,
            r.elapsed
        );
        assert!(
            r.elapsed < Duration::from_millis(timeout_ms + 1700),
            "{}: fallback took {:?} with escalation_timeout_ms = {timeout_ms}",
            ex.name,
            r.elapsed
        );
        assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
    }
    for ex in confident_examples() {
        let r = agent.infer(&ex.pixels).await;
        r.assert_ok_from("edge", &ex.name);
        assert_probs_close(&r.probabilities(), &ex.edge_probabilities, TOL, &ex.name);
    }

    // A replacement relay takes over without touching the agent.
    let _relay2 = RelayProc::start("mq-r1", RelayBroker::External(mosquitto.port)).await;
    mosquitto
        .proc
        .wait_for_log_count(
            "Sending SUBACK to cloud-relay-mq-r1",
            2,
            tierd_e2e::READY_TIMEOUT,
        )
        .await;
    let ex = &unsure[0];
    let r = agent.infer(&ex.pixels).await;
    r.assert_ok_from("cloud", &format!("{} after relay restart", ex.name));
    assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, TOL, &ex.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_share_the_escalations() {
    let Some(mut mosquitto) = start_mosquitto(free_port()).await else {
        return;
    };
    let _a = RelayProc::start("mq-share-a", RelayBroker::External(mosquitto.port)).await;
    let _b = RelayProc::start("mq-share-b", RelayBroker::External(mosquitto.port)).await;
    mosquitto.wait_for_suback("cloud-relay-mq-share-a").await;
    mosquitto.wait_for_suback("cloud-relay-mq-share-b").await;
    let agent = Arc::new(AgentProc::start(AgentOptions::new("mq-share-dev", mosquitto.port)).await);
    mosquitto.wait_for_suback("edge-agent-mq-share-dev").await;

    assert_concurrent_cloud_answers(&agent, 40, TOL).await;

    // Mosquitto logs every PUBLISH it sends: each escalation went to exactly one relay, and the
    // shared subscription spread them over both.
    let topic = "'tierd/v1/mq-share-dev/escalate/digits-edge'";
    let to_a = mosquitto.publishes_sent_to("cloud-relay-mq-share-a", topic);
    let to_b = mosquitto.publishes_sent_to("cloud-relay-mq-share-b", topic);
    eprintln!("escalations delivered: {to_a} to relay a, {to_b} to relay b");
    assert_eq!(
        to_a + to_b,
        40,
        "escalations delivered: {to_a} to relay a, {to_b} to relay b"
    );
    assert!(
        to_a > 0 && to_b > 0,
        "shared subscription did not spread the load: {to_a} to relay a, {to_b} to relay b"
    );
}

/// Polls the relay until the device's status matches, or fails with what it last saw.
async fn wait_status(
    relay: &RelayProc,
    device: &str,
    online: bool,
    reason: &str,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let (code, body) = relay.get_json(&format!("/api/devices/{device}")).await;
        let st = &body["status"];
        if code == 200 && st["online"] == online && st["reason"] == reason {
            return st.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "status of {device} never became online={online} reason={reason:?}; last: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The retained status topic: online after connecting; the broker publishes the last will
/// ("connection lost") when the agent is killed; a clean stop publishes "stopped" itself; a
/// restarted agent is online again under a new boot id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_online_then_last_will_on_kill_then_stopped_on_sigterm() {
    let Some(mut mosquitto) = start_mosquitto(free_port()).await else {
        return;
    };
    let relay = RelayProc::start("mq-status", RelayBroker::External(mosquitto.port)).await;
    mosquitto.wait_for_suback("cloud-relay-mq-status").await;
    let device = "mq-status-dev";
    let mut agent = AgentProc::start(AgentOptions::new(device, mosquitto.port)).await;
    let first = wait_status(&relay, device, true, "").await;

    agent.proc.kill();
    let will = wait_status(&relay, device, false, "connection lost").await;
    assert_eq!(
        will["boot_id"], first["boot_id"],
        "the will is about the run that died"
    );

    // A few ms apart at least, so the new run's boot id (start time in ms) is larger.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut again = AgentProc::start(AgentOptions::new(device, mosquitto.port)).await;
    let second = wait_status(&relay, device, true, "").await;
    assert!(
        second["boot_id"].as_u64() > first["boot_id"].as_u64(),
        "{first} then {second}"
    );

    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(again.proc.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = again.proc.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", again.proc.log_tail(20));
    let stopped = wait_status(&relay, device, false, "stopped").await;
    assert_eq!(stopped["boot_id"], second["boot_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pools_serve_two_models_behind_one_broker() {
    let Some(mut mosquitto) = start_mosquitto(free_port()).await else {
        return;
    };
    let root = tierd_e2e::repo_root().join("models");
    let port = mosquitto.port;
    // Pool "digits": two replicas; pool "breast": one. Each subscribes to its model only.
    let _d1 = RelayProc::start_serving(
        "pool-digits-1",
        RelayBroker::External(port),
        &root.join("cloud/digits-cloud.toml"),
        &["digits-edge"],
        "",
    )
    .await;
    let _d2 = RelayProc::start_serving(
        "pool-digits-2",
        RelayBroker::External(port),
        &root.join("cloud/digits-cloud.toml"),
        &["digits-edge"],
        "",
    )
    .await;
    let _b1 = RelayProc::start_serving(
        "pool-breast-1",
        RelayBroker::External(port),
        &root.join("cloud/breast-cloud.toml"),
        &["breast-edge"],
        "",
    )
    .await;
    for r in ["pool-digits-1", "pool-digits-2", "pool-breast-1"] {
        mosquitto.wait_for_suback(&format!("cloud-relay-{r}")).await;
    }
    let digits = Arc::new(AgentProc::start(AgentOptions::new("pool-dev-d", port)).await);
    let breast = AgentProc::start(
        AgentOptions::new("pool-dev-b", port)
            .model(&root.join("edge/breast-edge.toml"), Vec::new())
            .threshold(Some(1.01)), // escalate everything
    )
    .await;
    mosquitto.wait_for_suback("edge-agent-pool-dev-d").await;
    mosquitto.wait_for_suback("edge-agent-pool-dev-b").await;

    assert_concurrent_cloud_answers(&digits, 20, TOL).await;
    let cloud = tierd_runtime::Model::load(&root.join("cloud/breast-cloud.toml")).expect("cloud");
    let rows: Vec<Vec<f32>> = tierd_e2e::breast_rows().into_iter().take(10).collect();
    for row in &rows {
        let body = serde_json::json!({
            "inputs": [{ "name": "input", "shape": [1, row.len()], "datatype": "FP32", "data": row }]
        });
        let r = breast
            .post_json("/v2/models/breast-edge/infer", &body)
            .await;
        r.assert_ok_from("cloud", "breast escalation");
        let want = cloud
            .predict(&cloud.manifest().wire_input(row))
            .expect("cloud")
            .probabilities;
        assert_probs_close(&r.probabilities(), &want, TOL, "breast-cloud's answer");
    }

    // Mosquitto's log: each model's escalations reached only its own pool.
    let d_topic = "'tierd/v1/pool-dev-d/escalate/digits-edge'";
    let b_topic = "'tierd/v1/pool-dev-b/escalate/breast-edge'";
    let sent = |client: &str, topic: &str| mosquitto.publishes_sent_to(client, topic);
    let (d1, d2) = (
        sent("cloud-relay-pool-digits-1", d_topic),
        sent("cloud-relay-pool-digits-2", d_topic),
    );
    let b_to_digits =
        sent("cloud-relay-pool-digits-1", b_topic) + sent("cloud-relay-pool-digits-2", b_topic);
    let (b_to_breast, d_to_breast) = (
        sent("cloud-relay-pool-breast-1", b_topic),
        sent("cloud-relay-pool-breast-1", d_topic),
    );
    eprintln!(
        "digits escalations: {d1} + {d2} to the digits pool, {d_to_breast} to breast; \
         breast escalations: {b_to_breast} to the breast pool, {b_to_digits} to digits"
    );
    assert_eq!(d1 + d2, 20);
    assert_eq!(b_to_breast, rows.len());
    assert_eq!((b_to_digits, d_to_breast), (0, 0));
}

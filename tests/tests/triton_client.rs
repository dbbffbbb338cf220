//! An unmodified third-party Open Inference Protocol v2 client — NVIDIA's Python
//! `tritonclient.http` — against the real agent and relay, in both of its tensor encodings
//! (binary extension, its default, and plain JSON). The client script is `tests/clients/triton_client.py`.

use std::process::Command;

use tierd_e2e::{repo_root, AgentOptions, AgentProc, RelayBroker, RelayProc};

const SKIP_ENV: &str = "TIERD_SKIP_TRITONCLIENT";

fn tritonclient_available() -> bool {
    Command::new("python3")
        .args(["-c", "import tritonclient.http, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_tritonclient_works_against_the_agent() {
    if !tritonclient_available() {
        if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
            eprintln!("SKIPPED: python3 with tritonclient[http] not found and {SKIP_ENV}=1");
            return;
        }
        panic!("python3 with tritonclient is needed: `pip install 'tritonclient[http]'` (or set {SKIP_ENV}=1 to skip)");
    }
    let relay = RelayProc::start("triton-relay", RelayBroker::Embedded).await;
    let agent = AgentProc::start(AgentOptions::new("triton-agent", relay.broker_port)).await;
    let root = repo_root();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(root.join("tests/clients/triton_client.py"))
            .arg(format!("127.0.0.1:{}", agent.http_port))
            .arg(root.join("models/eval/examples.toml"))
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tritonclient failed:\n{stdout}\n{stderr}"
    );
    // Four inferences: confident/unsure × binary/JSON, each checked inside the script.
    assert_eq!(stdout.matches("infer ok:").count(), 4, "{stdout}");
    assert!(stdout.contains("tier=cloud"), "{stdout}");
}

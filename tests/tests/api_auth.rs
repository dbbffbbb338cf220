//! The relay's HTTP API refuses callers without its token (401) and requests for another
//! `Host` (421, DNS rebinding), changing nothing; `/health` stays open; the CLI authenticates
//! with `--token-file`. Real relay binary, embedded broker.

use serde_json::Value;
use tierd_e2e::{bin_path, http_client, RelayBroker, RelayProc};

const DEVICE: &str = "auth-1";

async fn published(relay: &RelayProc) -> Value {
    let (status, view) = relay
        .get_json(&format!("/api/devices/{DEVICE}/config"))
        .await;
    assert_eq!(status, 200, "{view}");
    view["published"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token_and_one_of_its_own_host_names() {
    let relay = RelayProc::start("auth", RelayBroker::Embedded).await;
    let path = format!("/api/devices/{DEVICE}/config");
    let before = published(&relay).await;

    // No token: 401 with a challenge and a body that says what is missing.
    let resp = http_client()
        .put(relay.url(&path))
        .body(r#"{"threshold": 0.1}"#)
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge:?}");
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no bearer token") && e.contains("--token-file")),
        "{body}"
    );
    // A wrong token: 401 too.
    let resp = http_client()
        .put(relay.url(&path))
        .bearer_auth("not-the-token")
        .body(r#"{"threshold": 0.1}"#)
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 401);
    // Reads need it as well by default.
    let resp = http_client()
        .get(relay.url("/api/devices"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 401);

    // The right token but a foreign Host (a rebound DNS name): 421, before the token counts.
    let resp = relay
        .request(reqwest::Method::PUT, &path)
        .header("host", "evil.example")
        .body(r#"{"threshold": 0.1}"#)
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 421);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("evil.example") && e.contains("DNS rebinding")),
        "{body}"
    );
    assert_eq!(
        published(&relay).await,
        before,
        "a refused PUT changed the config"
    );

    // /health answers anyone (the watchdog's probe).
    let resp = http_client()
        .get(relay.url("/health"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(resp.status().as_u16(), 200);

    // The CLI with --token-file: applied.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        // No agent has connected: configuring the device ahead of it needs --force.
        .args([
            "config",
            "set",
            "--force",
            "--device",
            DEVICE,
            "threshold=0.5",
        ])
        .args(["--api", &relay.url("")])
        .arg("--token-file")
        .arg(&relay.token_file)
        .env_remove("TIERD_RELAY_TOKEN")
        .output()
        .expect("cloud-relay config set");
    assert!(
        out.status.success(),
        "config set failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = published(&relay).await;
    assert_eq!(
        after["settings"]["threshold"].as_f64(),
        Some(0.5),
        "{after}"
    );

    // The CLI without any token (run elsewhere than the relay's state directory) says why.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args(["report", "--api", &relay.url("")])
        .current_dir(elsewhere.path())
        .env_remove("TIERD_RELAY_TOKEN")
        .env_remove("TIERD_RELAY_TOKEN_FILE")
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("cloud-relay report");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("401"), "{err}");
    // With --state-dir, it finds the generated token.
    let state_dir = relay.token_file.parent().expect("state dir");
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args(["report", "--api", &relay.url("")])
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("TIERD_RELAY_TOKEN")
        .output()
        .expect("cloud-relay report");
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

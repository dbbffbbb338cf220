//! The `edge-agent` command line: model checking and config errors.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tierd_e2e::{bin_path, cloud_manifest, edge_manifest, repo_root};

/// Runs `edge-agent args…` to completion (bounded) and returns its output.
fn edge_agent(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(bin_path("edge-agent"))
        .args(args)
        .env("RUST_LOG", "info,rumqttd=warn")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start edge-agent");
    let start = Instant::now();
    while child.try_wait().expect("wait on edge-agent").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap edge-agent");
            panic!(
                "edge-agent {args:?} did not finish within 60 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect edge-agent output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_model_accepts_the_committed_models() {
    for manifest in [edge_manifest(), cloud_manifest()] {
        let out = edge_agent(&["check-model".as_ref(), manifest.as_os_str()]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "check-model {} failed ({}):\n{stdout}\n{stderr}",
            manifest.display(),
            out.status
        );
        assert!(stdout.contains("golden"), "no golden line in:\n{stdout}");
        assert!(stdout.contains("6 vectors match"), "{stdout}");
        assert!(stdout.contains("sha256 ok"), "{stdout}");
    }
    // The relative path from the repository root, as the README shows it.
    let out = Command::new(bin_path("edge-agent"))
        .args([
            "check-model",
            "models/edge/digits-edge.toml",
            "--runs",
            "10",
        ])
        .current_dir(repo_root())
        .output()
        .expect("run edge-agent");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("golden"));
}

#[test]
fn check_model_rejects_a_tampered_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("models/edge");
    for f in ["digits-edge.toml", "digits-edge.onnx"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let onnx = dir.path().join("digits-edge.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&onnx, bytes).unwrap();

    let manifest = dir.path().join("digits-edge.toml");
    let out = edge_agent(&["check-model".as_ref(), manifest.as_os_str()]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "tampered model accepted:\n{}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains("sha256"),
        "stderr does not mention sha256:\n{stderr}"
    );
    assert!(
        !text(&out.stdout).contains("golden"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn run_rejects_an_invalid_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[cascade]\nthreshold = 7\n").unwrap();
    let out = edge_agent(&["run".as_ref(), "--config".as_ref(), config.as_os_str()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "invalid config accepted:\n{stderr}");
    assert!(
        stderr.contains("cascade.threshold"),
        "error does not name cascade.threshold:\n{stderr}"
    );

    // A missing config file is an error too, naming the file.
    let missing = dir.path().join("nope.toml");
    let out = edge_agent(&["run".as_ref(), "--config".as_ref(), missing.as_os_str()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "missing config accepted:\n{stderr}");
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

/// `cloud-relay keygen`: creates the key once (mode 0600), prints the same public key every
/// time; a relay refuses to start on a key file others may read, and says how to fix it.
#[test]
fn relay_keygen_creates_one_private_key_and_the_relay_refuses_a_loose_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let keygen = || {
        let out = Command::new(bin_path("cloud-relay"))
            .args(["keygen", "--print-public", "--state-dir"])
            .arg(dir.path())
            .output()
            .expect("cloud-relay keygen");
        assert!(out.status.success(), "keygen: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let first = keygen();
    assert!(
        first.starts_with("tierd-ed25519:") && first.len() == 14 + 64,
        "{first}"
    );
    assert_eq!(keygen(), first, "keygen must not replace an existing key");
    let key = dir.path().join("config-signing-key.pk8");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[embedded_broker]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[model]\nmanifest = {:?}\n",
            dir.path(),
            tierd_e2e::free_port(),
            tierd_e2e::free_port(),
            cloud_manifest()
        ),
    )
    .expect("relay.toml");
    let out = Command::new(bin_path("cloud-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("cloud-relay run");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the relay started on a 0644 key");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

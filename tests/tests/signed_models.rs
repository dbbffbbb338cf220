//! Signed models: `edge-agent model keygen` and `model sign`, and an agent with
//! `[model] trusted_keys` refusing unsigned, tampered or foreign-signed manifests (and a model
//! file swapped under a signed manifest) with a clear error, and serving a signed one. Real
//! binary, the committed edge model copied to a scratch directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tierd_e2e::{
    bin_path, edge_manifest, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc,
};

fn run(args: &[&str]) -> Output {
    Command::new(bin_path("edge-agent"))
        .args(args)
        .output()
        .expect("edge-agent")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of the committed edge model (manifest + ONNX) in `dir`.
fn copy_model(dir: &Path) -> PathBuf {
    let src = edge_manifest();
    let manifest = dir.join("digits-edge.toml");
    std::fs::copy(&src, &manifest).expect("copy manifest");
    let onnx = src.with_file_name("digits-edge.onnx");
    std::fs::copy(&onnx, dir.join("digits-edge.onnx")).expect("copy onnx");
    manifest
}

fn keygen(path: &Path) -> String {
    let out = run(&["model", "keygen", "--out", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "keygen: {}", text(&out));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(public.starts_with("tierd-ed25519:"), "{public}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    public
}

fn check(manifest: &Path, key: &str) -> Output {
    run(&[
        "check-model",
        "--runs",
        "10",
        "--trusted-key",
        key,
        manifest.to_str().expect("utf-8"),
    ])
}

#[test]
fn sign_then_verify_and_every_tampering_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("release.pk8");
    let public = keygen(&key_file);
    // Never overwrites a key.
    let again = run(&[
        "model",
        "keygen",
        "--out",
        key_file.to_str().expect("utf-8"),
    ]);
    assert!(!again.status.success(), "keygen overwrote a key");

    let manifest = copy_model(dir.path());
    let m = manifest.to_str().expect("utf-8");
    // Unsigned.
    let out = check(&manifest, &public);
    assert!(!out.status.success());
    assert!(text(&out).contains("it is unsigned"), "{}", text(&out));

    let out = run(&[
        "model",
        "sign",
        "--key",
        key_file.to_str().expect("utf-8"),
        m,
    ]);
    assert!(out.status.success(), "sign: {}", text(&out));
    let out = check(&manifest, &public);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("signature  ok"), "{}", text(&out));

    // Another release key is not trusted.
    let other = keygen(&dir.path().join("other.pk8"));
    let out = check(&manifest, &other);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("signed by unknown key"),
        "{}",
        text(&out)
    );

    // The manifest edited after signing (one golden tolerance loosened).
    let original = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        original.replacen("tolerance = 0.0001", "tolerance = 0.5", 1),
    )
    .expect("write");
    let out = check(&manifest, &public);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad signature"), "{}", text(&out));
    std::fs::write(&manifest, &original).expect("restore");

    // The model file swapped under the signed manifest: its sha256 no longer matches.
    let onnx = dir.path().join("digits-edge.onnx");
    let mut bytes = std::fs::read(&onnx).expect("onnx");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&onnx, bytes).expect("write onnx");
    let out = check(&manifest, &public);
    assert!(!out.status.success());
    assert!(text(&out).contains("sha256"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_trusted_model_keys_serves_only_a_signed_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("release.pk8");
    let public = keygen(&key_file);
    let manifest = copy_model(dir.path());

    // Unsigned: the agent refuses to start and says why.
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        AgentOptions::new("sig-1", 1)
            .model(&manifest, vec![public.clone()])
            .toml(tierd_e2e::free_port()),
    )
    .expect("agent.toml");
    let out = Command::new(bin_path("edge-agent"))
        .args(["run", "--config", cfg.to_str().expect("utf-8")])
        .output()
        .expect("edge-agent run");
    assert!(!out.status.success(), "an unsigned model was served");
    assert!(
        text(&out).contains("refused: model keys are trusted") && text(&out).contains("unsigned"),
        "{}",
        text(&out)
    );

    // Signed: served, and escalations still work.
    let out = run(&[
        "model",
        "sign",
        "--key",
        key_file.to_str().expect("utf-8"),
        manifest.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "sign: {}", text(&out));
    let relay = RelayProc::start("sig-relay", RelayBroker::Embedded).await;
    let agent = AgentProc::start(
        AgentOptions::new("sig-1", relay.broker_port).model(&manifest, vec![public]),
    )
    .await;
    assert!(agent
        .proc
        .log()
        .contains("model manifest signature verified"));
    let ex = &unsure_examples()[0];
    agent
        .infer(&ex.pixels)
        .await
        .assert_ok_from("cloud", "signed model");
}

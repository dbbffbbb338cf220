//! A real Open Inference Protocol v2 server that tierd did not write: MLServer serving an ONNX
//! model through onnxruntime (`tests/oip-server/serve.py`; `scripts/install-test-deps` installs
//! `mlserver` and `onnxruntime` from PyPI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::fixtures::repo_root;
use crate::processes::{free_port, Proc};

/// How long MLServer may take to load the model and listen (about 2 s here).
const OIP_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running MLServer with one model.
pub struct OipServer {
    pub proc: Proc,
    pub http_port: u16,
    grpc_port: u16,
    model: PathBuf,
    name: String,
    output: String,
    dir: TempDir,
    starts: usize,
}

impl OipServer {
    /// Serves `model` (an .onnx file) as `name` version 1.0.0, answering with graph output
    /// `output`; returns once `/v2/health/ready` answers 200.
    pub async fn start(model: &Path, name: &str, output: &str) -> OipServer {
        let dir = tempfile::Builder::new()
            .prefix("tierd-mlserver-")
            .tempdir()
            .expect("temp dir");
        let (http_port, grpc_port) = (free_port(), free_port());
        let mut s = OipServer {
            proc: spawn(model, name, output, http_port, grpc_port, dir.path(), 1),
            http_port,
            grpc_port,
            model: model.to_owned(),
            name: name.to_owned(),
            output: output.to_owned(),
            dir,
            starts: 1,
        };
        s.wait_ready().await;
        s
    }

    fn spawn_again(&mut self) -> Proc {
        self.starts += 1;
        spawn(
            &self.model,
            &self.name,
            &self.output,
            self.http_port,
            self.grpc_port,
            self.dir.path(),
            self.starts,
        )
    }

    /// `http://127.0.0.1:{port}`: the `[model.oip] url` for the relay.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SIGKILL: the server dies without a goodbye.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same ports and waits until it is ready.
    pub async fn restart(&mut self) {
        self.proc.kill();
        self.proc = self.spawn_again();
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let url = format!("{}/v2/health/ready", self.url());
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            self.proc.assert_running("starting MLServer");
            if start.elapsed() > OIP_READY_TIMEOUT {
                panic!(
                    "MLServer did not become ready within {OIP_READY_TIMEOUT:?}; its log:\n{}",
                    self.proc.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn(
    model: &Path,
    name: &str,
    output: &str,
    http_port: u16,
    grpc_port: u16,
    dir: &Path,
    n: usize,
) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/oip-server/serve.py"))
        .arg("--model")
        .arg(model)
        .args(["--name", name, "--output", output])
        .args(["--http-port", &http_port.to_string()])
        .args(["--grpc-port", &grpc_port.to_string()])
        .arg("--dir")
        .arg(dir.join("models"));
    Proc::spawn("mlserver", cmd, &dir.join(format!("mlserver-{n}.log")))
}

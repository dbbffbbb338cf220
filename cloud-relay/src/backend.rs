//! Where the cloud's answers come from: the built-in tract backend (the model runs in this
//! process), or an existing Open Inference Protocol v2 server (Triton, KServe, MLServer, ...)
//! that the relay forwards to over HTTP.
//!
//! Both start from the cloud model's manifest: it names the model (`name@version`, the identity
//! in replies and certificates), says how wire input becomes the graph's input (`[preprocess]`),
//! how many classes there are and whether the output is probabilities or logits. The OIP server
//! is sent the graph's FP32 input, exactly what tract would run, and its output is read as the
//! manifest says; so both backends give the same answer for the same model file, and the golden
//! vectors check the server serves the model the manifest describes.
//!
//! OIP: one `reqwest` client (HTTP/1.1 keep-alive, connections reused across requests), a
//! timeout per request, and at most `concurrency` requests in flight (the worker pool's size).
//! When the server is down or slow the reply is an error, and the agent answers its caller
//! with its own answer, as for any failed escalation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use thiserror::Error;
use tierd_protocol::{ReplyErrorCode, ReplyOutcome, Tensor};
use tierd_runtime::{InputError, Manifest, Model};

use crate::config::OipConfig;

/// Why the OIP server gave no usable answer.
#[derive(Debug, Error)]
pub enum OipError {
    #[error("OIP server {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("OIP server {url} did not answer within {timeout_ms} ms")]
    Timeout { url: String, timeout_ms: u64 },
    #[error("OIP server {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("OIP server {url} sent an answer tierd cannot use: {reason}")]
    BadAnswer { url: String, reason: String },
}

/// The cloud model behind the escalation workers.
#[derive(Clone)]
pub enum Backend {
    Tract(Model),
    Oip(Arc<Oip>),
}

impl Backend {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Backend::Tract(m) => m.manifest(),
            Backend::Oip(o) => &o.manifest,
        }
    }

    /// `name@version` of the cloud model, from its manifest.
    pub fn id(&self) -> String {
        self.manifest().id()
    }

    /// `tract` or `oip <url>`, for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Tract(_) => "tract (in process)".into(),
            Backend::Oip(o) => format!("oip {}", o.infer_url),
        }
    }

    /// The reply to one escalation's input.
    pub async fn answer(&self, input: &Tensor) -> ReplyOutcome {
        match self {
            Backend::Tract(model) => match model.predict(input) {
                Ok(p) => ReplyOutcome::Answer {
                    model: model.id(),
                    probabilities: p.probabilities,
                    compute_us: micros(p.compute),
                },
                Err(e) => input_error(e),
            },
            Backend::Oip(oip) => {
                let values = match oip.manifest.model_input(input) {
                    Ok(v) => v,
                    Err(e) => return input_error(e),
                };
                let started = Instant::now();
                match oip.infer(values).await {
                    Ok(outputs) => ReplyOutcome::Answer {
                        model: oip.manifest.id(),
                        probabilities: oip.manifest.probabilities(outputs),
                        compute_us: micros(started.elapsed()),
                    },
                    Err(e) => ReplyOutcome::Error {
                        code: ReplyErrorCode::Internal,
                        message: e.to_string(),
                    },
                }
            }
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

fn input_error(e: InputError) -> ReplyOutcome {
    match e {
        InputError::Runtime(m) => ReplyOutcome::Error {
            code: ReplyErrorCode::Internal,
            message: m,
        },
        e => ReplyOutcome::Error {
            code: ReplyErrorCode::BadShape,
            message: e.to_string(),
        },
    }
}

/// A client of one model on an OIP v2 server.
pub struct Oip {
    manifest: Manifest,
    client: reqwest::Client,
    infer_url: String,
    timeout: Duration,
}

/// Largest response body read from the server (a classifier's answer is a few hundred bytes).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct InferResponse {
    outputs: Vec<OutputTensor>,
}

#[derive(Deserialize)]
struct OutputTensor {
    name: String,
    #[serde(default)]
    datatype: String,
    data: Vec<f64>,
}

impl Oip {
    /// A client for the model `manifest` describes, served at `config.url` under
    /// `config.model` (default the manifest's name) and `config.version` (default its version;
    /// `""` for the server's default version).
    pub fn new(manifest: Manifest, config: &OipConfig) -> Result<Self, reqwest::Error> {
        let base = config.url.trim_end_matches('/');
        let name = config
            .model
            .clone()
            .unwrap_or_else(|| manifest.name.clone());
        let version = config
            .version
            .clone()
            .unwrap_or_else(|| manifest.version.clone());
        let infer_url = if version.is_empty() {
            format!("{base}/v2/models/{name}/infer")
        } else {
            format!("{base}/v2/models/{name}/versions/{version}/infer")
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(config.concurrency)
            .tcp_nodelay(true)
            .build()?;
        Ok(Oip {
            manifest,
            client,
            infer_url,
            timeout,
        })
    }

    pub fn infer_url(&self) -> &str {
        &self.infer_url
    }

    /// The graph's raw output for one FP32 input, from the server.
    pub async fn infer(&self, values: Vec<f32>) -> Result<Vec<f32>, OipError> {
        let m = &self.manifest;
        let body = json!({
            "inputs": [{
                "name": m.input.name,
                "shape": m.input.shape,
                "datatype": "FP32",
                "data": values,
            }],
            "outputs": [{ "name": m.output.name }],
        });
        let url = &self.infer_url;
        let sent = self.client.post(url).json(&body).send().await;
        let resp = sent.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let Some(bytes) = read_capped(resp)
            .await
            .map_err(|e| self.transport_error(e))?
        else {
            return Err(OipError::BadAnswer {
                url: url.clone(),
                reason: format!("the response is over {MAX_RESPONSE_BYTES} bytes"),
            });
        };
        if !status.is_success() {
            return Err(OipError::Status {
                url: url.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
            });
        }
        let bad = |reason: String| OipError::BadAnswer {
            url: url.clone(),
            reason,
        };
        let parsed: InferResponse =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an OIP response: {e}")))?;
        let out = match parsed.outputs.len() {
            1 => &parsed.outputs[0],
            _ => parsed
                .outputs
                .iter()
                .find(|o| o.name == m.output.name)
                .ok_or_else(|| bad(format!("no output named {:?}", m.output.name)))?,
        };
        if !out.datatype.is_empty() && out.datatype != "FP32" && out.datatype != "FP64" {
            return Err(bad(format!("output datatype {}, not FP32", out.datatype)));
        }
        if out.data.len() != m.output.labels.len() {
            return Err(bad(format!(
                "{} values for {} labels",
                out.data.len(),
                m.output.labels.len()
            )));
        }
        let outputs: Vec<f32> = out.data.iter().map(|&v| v as f32).collect();
        if let Some(i) = outputs.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("a non-finite value for class {i}")));
        }
        Ok(outputs)
    }

    fn transport_error(&self, e: reqwest::Error) -> OipError {
        if e.is_timeout() {
            OipError::Timeout {
                url: self.infer_url.clone(),
                timeout_ms: self.timeout.as_millis() as u64,
            }
        } else {
            // The chain says why (connection refused, reset, ...).
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = format!("{reason}: {s}");
                source = s.source();
            }
            OipError::Unreachable {
                url: self.infer_url.clone(),
                reason,
            }
        }
    }

    /// Runs the manifest's golden vectors through the server: `Ok(false)` when it cannot be
    /// reached (the relay starts anyway; agents fall back until it is up), an error when it
    /// answers differently (it serves another model than the manifest describes).
    pub async fn verify_golden(&self) -> Result<bool, String> {
        let m = &self.manifest;
        for (index, g) in m.golden.iter().enumerate() {
            let values = m
                .model_input(&m.wire_input(&g.input))
                .map_err(|e| format!("golden vector {index}: {e}"))?;
            let got = match self.infer(values).await {
                Ok(v) => v,
                Err(OipError::Unreachable { .. } | OipError::Timeout { .. }) => return Ok(false),
                Err(e) => return Err(e.to_string()),
            };
            for (class, (&expected, &actual)) in g.outputs.iter().zip(&got).enumerate() {
                let diff = (expected - actual).abs();
                if diff.is_nan() || diff > g.tolerance {
                    return Err(format!(
                        "{}: golden vector {index} differs at class {class}: expected \
                         {expected:.6}, the server answered {actual:.6} (tolerance {:.1e}); it \
                         does not serve the model this manifest describes",
                        self.infer_url, g.tolerance
                    ));
                }
            }
        }
        Ok(true)
    }
}

/// The body, or `None` when it is over [`MAX_RESPONSE_BYTES`] (not read further).
async fn read_capped(mut resp: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;

    /// An OIP-shaped server on 127.0.0.1 answering every infer with `status` and `body`.
    async fn fake_server(status: u16, body: String) -> String {
        let app = axum::Router::new().route(
            "/v2/models/{name}/versions/{v}/infer",
            post(move || {
                let body = body.clone();
                async move {
                    (
                        axum::http::StatusCode::from_u16(status).expect("status"),
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn client(url: String) -> Oip {
        let manifest = Manifest::from_path(&cloud_manifest_path()).expect("manifest");
        Oip::new(
            manifest,
            &OipConfig {
                url,
                model: None,
                version: None,
                timeout_ms: 500,
                concurrency: 2,
            },
        )
        .expect("client")
    }

    fn cloud_manifest_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cloud/digits-cloud.toml")
    }

    fn answer(data: &[f64]) -> String {
        json!({"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, data.len()], "data": data}]})
            .to_string()
    }

    #[tokio::test]
    async fn server_answers_are_checked_and_errors_say_what_went_wrong() {
        let ten = [0.1f64; 10];
        let ok = client(fake_server(200, answer(&ten)).await);
        assert_eq!(ok.infer(vec![0.0; 64]).await.expect("ok").len(), 10);

        let cases = [
            (200, answer(&[0.5, 0.5]), "2 values for 10 labels"),
            (
                500,
                "model exploded".to_string(),
                "answered 500: model exploded",
            ),
            (200, "not json".to_string(), "not an OIP response"),
            (
                200,
                "x".repeat(MAX_RESPONSE_BYTES + 10),
                "over 1048576 bytes",
            ),
            (
                200,
                json!({"outputs": [{"name": "p", "datatype": "INT64", "data": ten}]}).to_string(),
                "datatype INT64",
            ),
        ];
        for (status, body, needle) in cases {
            let c = client(fake_server(status, body).await);
            let err = c.infer(vec![0.0; 64]).await.unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        // Nobody listening: unreachable, and the golden check reports it as not reachable.
        let port = free_port();
        let dead = client(format!("http://127.0.0.1:{port}"));
        let err = dead.infer(vec![0.0; 64]).await.unwrap_err();
        assert!(matches!(err, OipError::Unreachable { .. }), "{err}");
        assert_eq!(dead.verify_golden().await, Ok(false));
        // A server answering other values is refused by the golden check.
        let wrong = client(fake_server(200, answer(&ten)).await);
        let why = wrong.verify_golden().await.unwrap_err();
        assert!(why.contains("does not serve the model"), "{why}");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }
}

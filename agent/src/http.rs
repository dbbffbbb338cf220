//! The local HTTP API: Open Inference Protocol v2 routes, admission control, error mapping.
//! The cascade itself is [`crate::cascade::Cascade`]; this module only maps OIP to and from it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use tierd_protocol::LatencySeries;

use crate::cascade::{self, Cascade};
use crate::escalation::Escalator;
use crate::oip::{self, InferResponse, ModelMetadata, ResponseOutput, TensorMetadata};
use crate::telemetry::Recorder;

/// The cascade over one served model.
pub type ModelCascade = Cascade<tierd_runtime::Model, Escalator>;

/// What the HTTP handlers share: the cascades they call (one per model served) and the front
/// end's own parts.
pub struct AppState {
    /// The primary model (`[model]`), the one the telemetry names.
    pub cascade: ModelCascade,
    /// Further models (`[[models]]`), each with its own policy, evidence and escalation topic.
    pub extra: Vec<ModelCascade>,
    pub admission: Admission,
    pub recorder: Arc<Recorder>,
    pub metrics: prometheus_client::registry::Registry,
    pub max_body_bytes: usize,
    /// Bearer token the routes require (`http.token_file`); health routes stay open.
    pub token: Option<Arc<str>>,
}

/// Routes open without the token: liveness and readiness probes (the watchdog's self-check).
const OPEN_PATHS: &[&str] = &["/v2/health/live", "/v2/health/ready"];

/// Why `http.token_file` could not be used.
pub use tierd_runtime::config::SecretError as TokenError;

/// The token in force, read from `http.token_file` (surrounding whitespace is not part of it).
/// Warns when the API listens beyond loopback without one.
pub fn load_token(http: &crate::config::HttpConfig) -> Result<Option<Arc<str>>, TokenError> {
    let Some(path) = &http.token_file else {
        if !http.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %http.listen,
                "the OIP API listens beyond loopback without a token: anyone who can reach \
                 {} can run inferences and read /metrics; set http.token_file",
                http.listen
            );
        }
        return Ok(None);
    };
    let token = tierd_runtime::config::read_secret(path, "http.token_file")?;
    tracing::info!(token_file = %path.display(), "OIP API requires a bearer token");
    Ok(Some(token.into()))
}

/// Refuses requests without the configured bearer token (401 + `WWW-Authenticate: Bearer`),
/// comparing in constant time; no token configured: everything passes.
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(expected) = token.as_deref() else {
        return next.run(req).await;
    };
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        })
        .map(|(_, t)| t.trim());
    let ok = presented.is_some_and(|t| {
        bool::from(subtle::ConstantTimeEq::ct_eq(
            t.as_bytes(),
            expected.as_bytes(),
        ))
    });
    if ok {
        return next.run(req).await;
    }
    let why = if presented.is_some() {
        "the bearer token is not this agent's"
    } else {
        "no bearer token"
    };
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!(
            "{why}: this agent requires `Authorization: Bearer <token>` (http.token_file) on \
             every route but /v2/health/live and /v2/health/ready"
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tierd-agent\""),
    );
    resp
}

/// Bounded admission: `workers` requests run, up to `queue` more wait; the rest get 503.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    workers: Arc<Semaphore>,
}

impl Admission {
    pub fn new(workers: usize, queue: usize) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(workers + queue)),
            workers: Arc::new(Semaphore::new(workers)),
        }
    }
}

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/v2/repository/index",
            get(repository_index).post(repository_index),
        )
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        // Bodies are read under our own limit so the client gets a JSON 400 naming the limit.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.token.clone(),
            require_token,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req, next| {
            body_limit(req, next, limit)
        }))
}

async fn body_limit(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    limit: usize,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "request body of {} bytes exceeds the limit of {limit} bytes",
                declared.unwrap_or(0)
            ),
        )
        .into_response();
    }
    // Chunked bodies without a length are capped while reading.
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Err(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body exceeds the limit of {limit} bytes"),
        )
        .into_response(),
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "tierd-edge-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match tierd_runtime::metrics::render(&state.metrics) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(tierd_runtime::metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded",
        )
        .into_response(),
    }
}

/// Triton's model repository index: every model served, each `READY` (a model that fails its
/// checks stops the agent from starting, so a listed model is a verified one).
async fn repository_index(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(
        state
            .cascades()
            .map(|c| {
                let model = c.model();
                let m = model.manifest();
                json!({ "name": m.name, "version": m.version, "state": "READY" })
            })
            .collect(),
    ))
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// Ready as soon as the model is verified: the edge answers even while the cloud is away.
async fn ready() -> Json<Value> {
    Json(json!({ "ready": true }))
}

impl AppState {
    /// Every model served, the primary first.
    pub fn cascades(&self) -> impl Iterator<Item = &ModelCascade> {
        std::iter::once(&self.cascade).chain(&self.extra)
    }
}

/// The cascade serving `name` (at `version`, if given), or a 404 naming what is served.
fn check_model<'a>(
    state: &'a AppState,
    name: &str,
    version: Option<&str>,
) -> Result<&'a ModelCascade, ApiError> {
    let Some(cascade) = state.cascades().find(|c| c.model().manifest().name == name) else {
        let served: Vec<String> = state
            .cascades()
            .map(|c| c.model().manifest().name.clone())
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model {name:?}; this agent serves {served:?}"),
        ));
    };
    let model = cascade.model();
    let m = model.manifest();
    if let Some(v) = version {
        if v != m.version {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} has no version {v:?}; loaded version is {:?}",
                    m.version
                ),
            ));
        }
    }
    Ok(cascade)
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    metadata(&state, &name, None)
}

async fn model_metadata_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    metadata(&state, &name, Some(&version))
}

fn metadata(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let model = check_model(state, name, version)?.model();
    let m = model.manifest();
    let shape: Vec<i64> = m.input.shape.iter().map(|&d| d as i64).collect();
    Ok(Json(ModelMetadata {
        name: m.name.clone(),
        versions: vec![m.version.clone()],
        platform: "onnx_tract",
        inputs: vec![TensorMetadata {
            name: m.input.name.clone(),
            datatype: m.wire_dtype().as_str(),
            shape,
        }],
        outputs: vec![TensorMetadata {
            name: m.output.name.clone(),
            datatype: "FP32",
            shape: vec![1, m.output.labels.len() as i64],
        }],
    }))
}

async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_model(&state, &name, None)?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

async fn model_ready_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_model(&state, &name, Some(&version))?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<InferResponse>, ApiError> {
    infer_inner(state, name, None, headers, body).await
}

async fn infer_v(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<InferResponse>, ApiError> {
    infer_inner(state, name, Some(version), headers, body).await
}

async fn infer_inner(
    state: Arc<AppState>,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<InferResponse>, ApiError> {
    let started = Instant::now();
    let result = infer_checked(&state, &name, version.as_deref(), &headers, &body, started).await;
    if let Err(e) = &result {
        if e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::NOT_FOUND {
            state
                .recorder
                .counters
                .bad_request
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = %e.status, error = %e.message, "rejected request");
        }
    }
    result
}

async fn infer_checked(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Result<Json<InferResponse>, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    // A request for a model we do not serve is refused before it takes a queue slot.
    let cascade = check_model(state, name, version)?;
    let Ok(_slot) = state.admission.slots.clone().try_acquire_owned() else {
        state
            .recorder
            .counters
            .overloaded
            .fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "inference queue is full; retry shortly",
        ));
    };
    let _worker =
        state.admission.workers.acquire().await.map_err(|_| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down")
        })?;
    state
        .recorder
        .record(LatencySeries::StageQueue, started.elapsed());

    let header_len = match headers.get("inference-header-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length is not a number".into()))?,
        ),
    };
    let (req, binary) = oip::parse_request(body, header_len).map_err(|e| bad(e.0))?;
    let model = cascade.model();
    let manifest = model.manifest();
    if let Some(outputs) = &req.outputs {
        if let Some(o) = outputs.iter().find(|o| o.name != manifest.output.name) {
            return Err(bad(format!(
                "unknown output {:?}; the model's output is {:?}",
                o.name, manifest.output.name
            )));
        }
    }
    let input = oip::input_tensor(&req, binary, &manifest.input.name).map_err(|e| bad(e.0))?;
    let outcome = cascade.infer(input, started).await.map_err(|e| match e {
        tierd_runtime::InputError::Runtime(m) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("edge model failed: {m}"),
        ),
        other => bad(other.to_string()),
    })?;
    Ok(Json(response(manifest, req.id, outcome, started)))
}

/// The OIP answer for one outcome: the probabilities as the output tensor, the cascade's
/// decision in `parameters`.
fn response(
    manifest: &tierd_runtime::Manifest,
    id: Option<String>,
    outcome: cascade::Outcome,
    started: Instant,
) -> InferResponse {
    let answer = outcome.answer;
    let mut params = Map::new();
    params.insert("tier".into(), answer.tier.as_str().into());
    params.insert("confidence".into(), json!(outcome.confidence));
    params.insert("threshold".into(), json!(outcome.threshold));
    params.insert("signal".into(), outcome.signal.as_str().into());
    if let Some(reason) = &answer.fallback {
        params.insert("fallback_reason".into(), reason.as_str().into());
    }
    let top = cascade::top1(&answer.probabilities);
    if let Some(label) = manifest.output.labels.get(top) {
        params.insert("label".into(), label.clone().into());
    }
    params.insert(
        "edge_compute_us".into(),
        json!(outcome.edge_compute.as_micros() as u64),
    );
    if let Some(took) = outcome.escalation {
        params.insert("escalation_us".into(), json!(took.as_micros() as u64));
    }
    params.insert(
        "latency_us".into(),
        json!(started.elapsed().as_micros() as u64),
    );
    InferResponse {
        model_name: manifest.name.clone(),
        model_version: manifest.version.clone(),
        id,
        parameters: params,
        outputs: vec![ResponseOutput {
            name: manifest.output.name.clone(),
            datatype: "FP32",
            shape: vec![1, answer.probabilities.len() as u64],
            data: answer.probabilities,
        }],
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Status of one HTTP/1.1 request to `app` served on an ephemeral port.
    async fn status(app: Router, path: &str, auth: Option<&str>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        server.abort();
        out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap()
    }

    fn app(token: Option<&str>) -> Router {
        Router::new()
            .route("/v2/health/live", get(live))
            .route("/v2", get(server_metadata))
            .layer(axum::middleware::from_fn_with_state(
                token.map(Arc::from),
                require_token,
            ))
    }

    #[tokio::test]
    async fn a_configured_token_is_enforced_and_liveness_stays_open() {
        assert_eq!(status(app(Some("s3cret")), "/v2", None).await, 401);
        assert_eq!(
            status(app(Some("s3cret")), "/v2", Some("Bearer nope")).await,
            401
        );
        assert_eq!(
            status(app(Some("s3cret")), "/v2", Some("Basic s3cret")).await,
            401
        );
        assert_eq!(
            status(app(Some("s3cret")), "/v2", Some("Bearer s3cret")).await,
            200
        );
        assert_eq!(
            status(app(Some("s3cret")), "/v2/health/live", None).await,
            200
        );
        // Without a token configured, nothing changes.
        assert_eq!(status(app(None), "/v2", None).await, 200);
    }

    #[test]
    fn the_token_file_is_read_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, "abc\n").unwrap();
        let http = crate::config::HttpConfig {
            token_file: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(load_token(&http).unwrap().as_deref(), Some("abc"));
        std::fs::write(&file, " \n").unwrap();
        assert!(matches!(load_token(&http), Err(TokenError::Empty { .. })));
        let none = crate::config::HttpConfig::default();
        assert!(load_token(&none).unwrap().is_none());
    }
}

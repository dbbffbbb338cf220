//! Whatever a client sends, the agent answers with a precise 4xx and keeps serving.

use std::time::Duration;

use serde_json::{json, Value};
use tierd_e2e::{
    assert_probs_close, example, free_port, AgentOptions, AgentProc, InferResult, EDGE_MODEL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INFER: &str = "/v2/models/digits-edge/infer";
const BODY_LIMIT: usize = 4096;

async fn agent(device: &str) -> AgentProc {
    AgentProc::start(
        AgentOptions::new(device, free_port())
            .max_body_bytes(BODY_LIMIT)
            .without_broker(),
    )
    .await
}

fn input(shape: Value, datatype: &str, data: Value) -> Value {
    json!({ "inputs": [{ "name": "input", "shape": shape, "datatype": datatype, "data": data }] })
}

fn assert_rejected(r: &InferResult, status: u16, needles: &[&str], what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    let err = r.error();
    assert!(!err.is_empty(), "{what}: no JSON `error` in {}", r.body);
    for n in needles {
        assert!(
            err.to_lowercase().contains(&n.to_lowercase()),
            "{what}: {n:?} not in error {err:?}"
        );
    }
}

/// Sends a chunked body without Content-Length over a raw socket; returns (status, body text).
async fn post_chunked(port: u16, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may answer (and close) before reading everything; that is fine.
    let _ = s.write_all(&req).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .expect("no answer to the chunked request within 10 s");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors_and_the_agent_keeps_serving() {
    let agent = agent("bad-input").await;
    let good = example("confident");
    let pixels = &good.pixels;

    let r = agent
        .post_json(
            "/v2/models/nope/infer",
            &input(json!([1, 64]), "UINT8", json!(pixels)),
        )
        .await;
    assert_rejected(&r, 404, &["nope", EDGE_MODEL], "unknown model");

    let r = agent
        .post_json(
            "/v2/models/digits-edge/versions/9.9.9/infer",
            &input(json!([1, 64]), "UINT8", json!(pixels)),
        )
        .await;
    assert_rejected(&r, 404, &["9.9.9"], "unknown version");

    let r = agent
        .post_json(INFER, &input(json!([1, 63]), "UINT8", json!(&pixels[..63])))
        .await;
    assert_rejected(&r, 400, &["shape", "[1, 63]"], "shape [1,63]");

    let r = agent
        .post_json(INFER, &input(json!([2, 32]), "UINT8", json!(pixels)))
        .await;
    assert_rejected(&r, 400, &["shape", "[2, 32]"], "shape [2,32]");

    let two: Vec<u8> = pixels.iter().chain(pixels).copied().collect();
    let r = agent
        .post_json(INFER, &input(json!([2, 64]), "UINT8", json!(two)))
        .await;
    assert_rejected(&r, 400, &["batch size 2"], "batch of 2");

    let r = agent
        .post_json(INFER, &input(json!([1, 64]), "UINT8", json!(&pixels[..10])))
        .await;
    assert_rejected(&r, 400, &["64 elements", "10"], "element count");

    let r = agent
        .post_json(INFER, &input(json!([1, 64]), "INT64", json!(pixels)))
        .await;
    assert_rejected(&r, 400, &["INT64", "not supported"], "datatype INT64");

    let r = agent.post_raw(INFER, b"{\"inputs\": [".to_vec(), &[]).await;
    assert_rejected(&r, 400, &["malformed JSON"], "malformed JSON");

    let big = vec![b' '; 10 * 1024];
    let r = agent.post_raw(INFER, big.clone(), &[]).await;
    assert_rejected(
        &r,
        400,
        &["exceeds the limit", &BODY_LIMIT.to_string()],
        "10 KB body",
    );
    let (status, text) = post_chunked(agent.http_port, INFER, &big).await;
    assert_eq!(status, 400, "chunked 10 KB body: {text}");
    assert!(
        text.contains("exceeds the limit") && text.contains(&BODY_LIMIT.to_string()),
        "chunked 10 KB body: {text}"
    );

    let mut over = pixels.iter().map(|&p| u64::from(p)).collect::<Vec<_>>();
    over[5] = 300;
    let r = agent
        .post_json(INFER, &input(json!([1, 64]), "UINT8", json!(over)))
        .await;
    assert_rejected(&r, 400, &["data[5]", "300", "UINT8"], "UINT8 value 300");

    let r = agent
        .post_json(
            INFER,
            &input(json!([1, 64]), "FP32", json!(vec![f64::MAX; 64])),
        )
        .await;
    assert_rejected(&r, 400, &["data[0]", "FP32"], "FP32 overflow");

    let r = agent
        .post_json(
            INFER,
            &json!({ "inputs": [{ "name": "x", "shape": [1, 64], "datatype": "UINT8", "data": pixels }] }),
        )
        .await;
    assert_rejected(&r, 400, &["unknown input", "\"x\""], "wrong input name");

    // A binary header whose declared length runs past the body.
    let r = agent
        .post_raw(
            INFER,
            b"{}".to_vec(),
            &[("Inference-Header-Content-Length", "100".into())],
        )
        .await;
    assert_rejected(
        &r,
        400,
        &["exceeds the body length"],
        "header length > body",
    );

    // After all of that, the agent still answers.
    let r = agent.infer(pixels).await;
    r.assert_ok_from("edge", "good request after bad ones");
    assert_probs_close(&r.probabilities(), &good.edge_probabilities, 1e-4, "good");
    let (status, body) = agent.get("/v2/health/live").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_extension_is_accepted() {
    let agent = agent("bad-input-binary").await;
    let ex = example("confident");
    let header = json!({
        "id": "bin-1",
        "inputs": [{
            "name": "input",
            "shape": [1, 64],
            "datatype": "UINT8",
            "parameters": { "binary_data_size": 64 },
        }],
        "outputs": [{ "name": "probabilities" }],
    })
    .to_string()
    .into_bytes();
    let mut body = header.clone();
    body.extend_from_slice(&ex.pixels);
    assert_eq!(ex.pixels.len(), 64);
    let r = agent
        .post_raw(
            INFER,
            body,
            &[("Inference-Header-Content-Length", header.len().to_string())],
        )
        .await;
    r.assert_ok_from("edge", "binary tensor request");
    assert_eq!(r.body["id"], "bin-1");
    assert_probs_close(&r.probabilities(), &ex.edge_probabilities, 1e-4, "binary");

    // The same with a size that does not match the bytes sent.
    let mut header2: Value = serde_json::from_slice(&header).unwrap();
    header2["inputs"][0]["parameters"]["binary_data_size"] = json!(63);
    let header2 = header2.to_string().into_bytes();
    let mut body = header2.clone();
    body.extend_from_slice(&ex.pixels);
    let r = agent
        .post_raw(
            INFER,
            body,
            &[("Inference-Header-Content-Length", header2.len().to_string())],
        )
        .await;
    assert_rejected(&r, 400, &["binary_data_size 63"], "binary size mismatch");
}

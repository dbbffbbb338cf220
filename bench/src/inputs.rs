//! Bench inputs: the named examples of `models/eval/examples.toml` and OIP v2 request bodies.

use std::path::Path;

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::{json, Value};

/// One named example and the tier the agent must answer it from.
#[derive(Debug, Clone)]
pub struct Example {
    pub name: String,
    pub pixels: Vec<u8>,
    pub expected_tier: &'static str,
}

/// Reads every `[[example]]`; `confident*` must be answered by the edge, `unsure*` by the cloud.
pub fn load_examples(path: &Path) -> anyhow::Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    let list = doc
        .get("example")
        .and_then(|v| v.as_array())
        .with_context(|| format!("{}: no [[example]] tables", path.display()))?;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let name = e
            .get("name")
            .and_then(|v| v.as_str())
            .context("example without a name")?
            .to_owned();
        let pixels = e
            .get("pixels")
            .and_then(|v| v.as_array())
            .with_context(|| format!("example {name} has no pixels"))?
            .iter()
            .map(|p| {
                p.as_integer()
                    .and_then(|i| u8::try_from(i).ok())
                    .with_context(|| format!("example {name}: pixel {p} is not a u8"))
            })
            .collect::<anyhow::Result<Vec<u8>>>()?;
        let expected_tier = if name.starts_with("confident") {
            "edge"
        } else if name.starts_with("unsure") {
            "cloud"
        } else {
            bail!("example {name:?} is neither confident* nor unsure*");
        };
        out.push(Example {
            name,
            pixels,
            expected_tier,
        });
    }
    Ok(out)
}

pub fn example<'a>(examples: &'a [Example], name: &str) -> anyhow::Result<&'a Example> {
    examples
        .iter()
        .find(|e| e.name == name)
        .with_context(|| format!("examples.toml has no example named {name:?}"))
}

/// An OIP v2 infer body with raw UINT8 pixels, serialized once so the client's JSON encoding
/// stays out of the timed loop.
pub fn infer_body(id: &str, input_name: &str, pixels: &[u8]) -> Bytes {
    let body = json!({
        "id": id,
        "inputs": [{
            "name": input_name,
            "shape": [1, pixels.len()],
            "datatype": "UINT8",
            "data": pixels,
        }],
    });
    Bytes::from(serde_json::to_vec(&body).expect("a json! value always serializes"))
}

/// What an infer response says about where it was answered.
pub struct Answer {
    pub tier: String,
    pub fallback_reason: Option<String>,
}

pub fn parse_answer(body: &[u8]) -> anyhow::Result<Answer> {
    let v: Value = serde_json::from_slice(body).context("response is not JSON")?;
    let params = &v["parameters"];
    let tier = params["tier"]
        .as_str()
        .with_context(|| format!("response has no parameters.tier: {v}"))?
        .to_owned();
    Ok(Answer {
        tier,
        fallback_reason: params["fallback_reason"].as_str().map(str::to_owned),
    })
}

/// POSTs a prepared body and returns the raw response body; any non-2xx status is an error.
pub async fn post(client: &reqwest::Client, url: &str, body: Bytes) -> anyhow::Result<Bytes> {
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the response body")?;
    if !status.is_success() {
        bail!(
            "POST {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(bytes)
}

/// Checks that a response came from `expected` tier.
pub fn check_tier(body: &[u8], expected: &str, what: &str) -> anyhow::Result<()> {
    let a = parse_answer(body)?;
    if a.tier != expected {
        bail!(
            "{what}: expected tier {expected}, got {}{}",
            a.tier,
            a.fallback_reason
                .map(|r| format!(" (fallback reason {r})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

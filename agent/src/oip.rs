//! Open Inference Protocol v2 (KServe / Triton REST) request parsing and response shapes.
//! Pure: bytes in, a validated [`Tensor`] or a client-facing error out.
//!
//! Both encodings a stock client may send are accepted: plain JSON with `data`, and Triton's
//! binary tensor extension (`Inference-Header-Content-Length` header, JSON header followed by raw
//! little-endian tensor bytes, `parameters.binary_data_size` per input), which is what Python
//! `tritonclient.http` uses by default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tierd_protocol::{Tensor, TensorData, MAX_TENSOR_ELEMENTS};

tierd_protocol::reason_error!(
    /// Why a request body is not a valid OIP v2 inference request; the message is for the client
    /// that sent it (HTTP 400).
    OipError
);

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub data: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

#[derive(Debug, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// Parses a request body. `header_len` is the value of `Inference-Header-Content-Length`, if any.
pub fn parse_request(
    body: &[u8],
    header_len: Option<usize>,
) -> Result<(InferRequest, &[u8]), OipError> {
    let (json, binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(OipError::from(format!(
                "Inference-Header-Content-Length {n} exceeds the body length {}",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let req: InferRequest =
        serde_json::from_slice(json).map_err(|e| format!("malformed JSON request: {e}"))?;
    Ok((req, binary))
}

/// Converts the single input of a request into a tensor, taking binary data from `binary`.
pub fn input_tensor(
    req: &InferRequest,
    binary: &[u8],
    expected_name: &str,
) -> Result<Tensor, OipError> {
    let input = match req.inputs.as_slice() {
        [one] => one,
        [] => return Err(OipError::from("request has no inputs")),
        many => {
            return Err(OipError::from(format!(
                "request has {} inputs; the model takes exactly one, {expected_name:?}",
                many.len()
            )))
        }
    };
    if input.name != expected_name {
        return Err(OipError::from(format!(
            "unknown input {:?}; the model's input is {expected_name:?}",
            input.name
        )));
    }
    let mut shape = Vec::with_capacity(input.shape.len());
    for &d in &input.shape {
        let d = u32::try_from(d)
            .map_err(|_| format!("shape {:?} has an invalid dimension {d}", input.shape))?;
        shape.push(d);
    }
    let binary_size = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .map(|v| {
            v.as_u64().map(|n| n as usize).ok_or_else(|| {
                "parameters.binary_data_size must be a non-negative integer".to_string()
            })
        })
        .transpose()?;
    let data = match (binary_size, &input.data) {
        (Some(_), Some(_)) => {
            return Err(OipError::from("input has both data and binary_data_size"))
        }
        (None, None) => {
            return Err(OipError::from(format!(
                "input {:?} has no data",
                input.name
            )))
        }
        (Some(n), None) => {
            if n != binary.len() {
                return Err(OipError::from(format!(
                    "binary_data_size {n} does not match the {} bytes after the JSON header",
                    binary.len()
                )));
            }
            binary_data(&input.datatype, binary)?
        }
        (None, Some(v)) => {
            // Bytes after the JSON header that no input claims would be silently ignored;
            // a client that sent them meant something else, so say so.
            if !binary.is_empty() {
                return Err(OipError::from(format!(
                    "{} bytes follow the JSON header but input {:?} carries JSON data, not binary_data_size",
                    binary.len(),
                    input.name
                )));
            }
            json_data(&input.datatype, v)?
        }
    };
    let t = Tensor { shape, data };
    t.validate().map_err(|e| OipError(e.to_string()))?;
    Ok(t)
}

fn binary_data(datatype: &str, bytes: &[u8]) -> Result<TensorData, OipError> {
    match datatype {
        "UINT8" => Ok(TensorData::U8(bytes.to_vec())),
        "FP32" => {
            if !bytes.len().is_multiple_of(4) {
                return Err(OipError::from(format!(
                    "FP32 binary data of {} bytes is not a multiple of 4",
                    bytes.len()
                )));
            }
            Ok(TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ))
        }
        other => Err(OipError::from(unsupported(other))),
    }
}

fn unsupported(datatype: &str) -> String {
    format!(
        "datatype {datatype:?} is not supported; send UINT8 (raw pixels) or FP32 (preprocessed)"
    )
}

/// Flattens row-major (possibly nested) JSON arrays, checking each element's type and range.
fn json_data(datatype: &str, v: &Value) -> Result<TensorData, OipError> {
    let mut flat = Vec::new();
    flatten(v, &mut flat, 0)?;
    match datatype {
        "UINT8" => flat
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&n| n <= 255)
                    .map(|n| n as u8)
                    .ok_or_else(|| {
                        OipError(format!("data[{i}] = {x} is not a UINT8 (integer 0..=255)"))
                    })
            })
            .collect::<Result<_, _>>()
            .map(TensorData::U8),
        "FP32" => flat
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .map(|f| f as f32)
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| OipError(format!("data[{i}] = {x} is not a finite FP32 number")))
            })
            .collect::<Result<_, _>>()
            .map(TensorData::F32),
        other => Err(OipError::from(unsupported(other))),
    }
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, depth: usize) -> Result<(), OipError> {
    if depth > tierd_protocol::MAX_TENSOR_RANK {
        return Err(OipError::from(
            "data is nested deeper than the largest supported rank",
        ));
    }
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, depth + 1)?;
                if out.len() > MAX_TENSOR_ELEMENTS {
                    return Err(OipError::from(format!(
                        "data has more than {MAX_TENSOR_ELEMENTS} elements"
                    )));
                }
            }
            Ok(())
        }
        Value::Number(_) => {
            out.push(v);
            Ok(())
        }
        other => Err(OipError::from(format!(
            "data contains {other}, which is not a number"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<Tensor, OipError> {
        let (r, bin) = parse_request(json.as_bytes(), None)?;
        input_tensor(&r, bin, "input")
    }

    #[test]
    fn parses_flat_and_nested_uint8() {
        let t = req(
            r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"UINT8","data":[0,1,2,255]}]}"#,
        )
        .unwrap();
        assert_eq!(t.data, TensorData::U8(vec![0, 1, 2, 255]));
        let t = req(r#"{"inputs":[{"name":"input","shape":[2,2],"datatype":"UINT8","data":[[0,1],[2,3]]}]}"#).unwrap();
        assert_eq!(t.data, TensorData::U8(vec![0, 1, 2, 3]));
    }

    #[test]
    fn parses_fp32() {
        let t =
            req(r#"{"inputs":[{"name":"input","shape":[2],"datatype":"FP32","data":[0.5, 1]}]}"#)
                .unwrap();
        assert_eq!(t.data, TensorData::F32(vec![0.5, 1.0]));
    }

    #[test]
    fn parses_binary_extension() {
        let header = br#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"UINT8","parameters":{"binary_data_size":3}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[7, 8, 9]);
        let (r, bin) = parse_request(&body, Some(header.len())).unwrap();
        assert_eq!(
            input_tensor(&r, bin, "input").unwrap().data,
            TensorData::U8(vec![7, 8, 9])
        );

        let header = br#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        let (r, bin) = parse_request(&body, Some(header.len())).unwrap();
        assert_eq!(
            input_tensor(&r, bin, "input").unwrap().data,
            TensorData::F32(vec![1.5])
        );
    }

    #[test]
    fn unclaimed_binary_bytes_are_rejected() {
        let json =
            br#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"UINT8","data":[1,2]}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[9, 9, 9]);
        let (req, binary) = parse_request(&body, Some(json.len())).expect("parses");
        let err = input_tensor(&req, binary, "input").expect_err("stray bytes");
        assert!(err.0.contains("3 bytes follow the JSON header"), "{err}");
        let (req, binary) = parse_request(json, Some(json.len())).expect("parses");
        assert!(input_tensor(&req, binary, "input").is_ok());
    }

    #[test]
    fn bad_requests_name_the_problem() {
        for (body, needle) in [
            ("{not json", "malformed JSON"),
            (r#"{"inputs":[]}"#, "no inputs"),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[1]}]}"#,
                "unknown input",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"INT64","data":[1]}]}"#,
                "not supported",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"UINT8","data":[256]}]}"#,
                "data[0]",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"UINT8","data":[1.5]}]}"#,
                "not a UINT8",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"UINT8","data":["a"]}]}"#,
                "not a number",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[3],"datatype":"UINT8","data":[1,2]}]}"#,
                "elements",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[-1],"datatype":"UINT8","data":[1]}]}"#,
                "invalid dimension",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"UINT8"}]}"#,
                "no data",
            ),
        ] {
            let err = req(body).unwrap_err();
            assert!(err.0.contains(needle), "{needle:?} not in {err:?}");
        }
        assert!(parse_request(b"{}", Some(10))
            .unwrap_err()
            .0
            .contains("exceeds"));
    }
}

//! Reader for the labelled evaluation streams in `models/eval/` (`stream.bin`, `drift.bin`),
//! which the demo and the replay harness feed through the cascade.
//!
//! Format (little-endian): magic `TIERDEV1`, `u32` record count, then 66-byte records of
//! `label: u8`, `severity: u8` (0 = in-distribution, 1 = drift), `pixels: [u8; 64]`.

use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &[u8; 8] = b"TIERDEV1";
const RECORD: usize = 66;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub label: u8,
    pub severity: u8,
    pub pixels: Vec<u8>,
}

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Reads a whole stream, checking magic and length.
pub fn read(path: &Path) -> Result<Vec<Record>, StreamError> {
    let bytes = std::fs::read(path).map_err(|e| StreamError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    parse(&bytes).map_err(|reason| StreamError::Format {
        path: path.to_owned(),
        reason: reason.0,
    })
}

pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, StreamFormat> {
    let (head, body) = bytes
        .split_at_checked(12)
        .ok_or(StreamFormat::from("shorter than the 12-byte header"))?;
    if &head[..8] != MAGIC {
        return Err(StreamFormat::from("bad magic: not a TIERDEV1 stream"));
    }
    let n = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if body.len() != n.saturating_mul(RECORD) {
        return Err(StreamFormat::from(format!(
            "header says {n} records ({} bytes) but {} bytes follow",
            n.saturating_mul(RECORD),
            body.len()
        )));
    }
    Ok(body
        .chunks_exact(RECORD)
        .map(|r| Record {
            label: r[0],
            severity: r[1],
            pixels: r[2..].to_vec(),
        })
        .collect())
}

tierd_protocol::reason_error!(
    /// Why bytes are not an evaluation stream.
    StreamFormat
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(7);
        b.push(1);
        b.extend_from_slice(&[3; 64]);
        let r = parse(&b).unwrap();
        assert_eq!((r[0].label, r[0].severity, r[0].pixels.len()), (7, 1, 64));
        assert!(parse(&b[..b.len() - 1]).unwrap_err().0.contains("records"));
        assert!(parse(b"TIERDEV2\0\0\0\0").unwrap_err().0.contains("magic"));
        assert!(parse(b"x").is_err());
    }

    #[test]
    fn committed_stream_is_well_formed() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/eval/stream.bin");
        let r = read(&path).unwrap();
        assert!(r.len() >= 20_000);
        assert!(r.iter().all(|x| x.label < 10 && x.severity == 0));
    }
}

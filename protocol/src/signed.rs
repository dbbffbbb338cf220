//! Signed config documents: the relay signs every [`ConfigDocument`] it issues with Ed25519,
//! and an agent applies only documents signed by a relay key it pins.
//!
//! # The envelope
//!
//! The retained payload on `tierd/v1/{device}/config` is a small JSON object:
//!
//! ```json
//! {"alg":"ed25519","key_id":"9f86d081884c7d65","doc":"{\"version\":7,...}","sig":"<128 hex digits>"}
//! ```
//!
//! - `doc`: the document's JSON text ([`ConfigDocument::to_json`]), carried as a JSON string.
//!   The signature covers **exactly these bytes** (the UTF-8 of the unescaped string): no
//!   canonicalisation, and the verifier parses only the bytes it verified.
//! - `sig`: the Ed25519 signature (64 bytes, lowercase hex).
//! - `key_id`: the first 8 bytes of SHA-256 over the 32-byte public key, hex. It only selects
//!   the key among the trusted ones; a forged id still has to produce a valid signature.
//! - `alg`: always `ed25519`.
//!
//! Unknown fields are errors (`deny_unknown_fields`). The payload's size is checked before
//! anything is parsed ([`MAX_SIGNED_BYTES`]), the document's own limit
//! ([`crate::config::MAX_CONFIG_BYTES`]) after verification.
//!
//! # Public keys as text
//!
//! `tierd-ed25519:` followed by the 32-byte key in 64 hex digits, as `cloud-relay keygen`
//! prints it and `agent.toml`'s `[remote_config] trusted_keys` lists it.
//!
//! # Order of the checks ([`verify`])
//!
//! size → trusted keys configured → envelope (a bare document is reported as unsigned) →
//! algorithm → key id among the trusted keys → signature → document ([`ConfigDocument::from_json`]).

use std::fmt;
use std::str::FromStr;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigDocError, ConfigDocument, MAX_CONFIG_BYTES};

/// Prefix of a public key's text form.
pub const PUBLIC_KEY_PREFIX: &str = "tierd-ed25519:";
/// The one signature algorithm.
pub const ALG: &str = "ed25519";
/// Largest signed payload accepted, in bytes: a document at its limit, escaped, plus the
/// envelope's fields.
pub const MAX_SIGNED_BYTES: usize = 2 * MAX_CONFIG_BYTES + 512;

/// Why a key (text or PKCS#8) is refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("public key {0:?} is not `{PUBLIC_KEY_PREFIX}` followed by 64 hex digits")]
    PublicText(String),
    #[error("not an Ed25519 key pair in PKCS#8 v2: {0}")]
    Pkcs8(String),
    #[error("cannot generate a key pair: the system random source failed")]
    Random,
}

/// A relay's Ed25519 public key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// First 8 bytes of SHA-256 over the key, hex.
    pub fn key_id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex::encode(&digest.as_ref()[..8])
    }

    /// Whether `sig` is this key's signature over exactly `message`.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::PublicText(text.chars().take(100).collect());
        let hex_part = text
            .trim()
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad())?;
        Ok(PublicKey(bytes))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A relay's signing key (Ed25519), from its PKCS#8 v2 bytes.
pub struct Signer {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.public)
    }
}

impl Signer {
    /// A new key pair, as PKCS#8 v2 bytes (what the key file holds).
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| KeyError::Random)
    }

    pub fn from_pkcs8(bytes: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| KeyError::Pkcs8(e.to_string()))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Signer {
            pair,
            public: PublicKey(public),
        })
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The envelope carrying `doc_json` and this key's signature over exactly those bytes.
    /// `doc_json` must be UTF-8 (every [`ConfigDocument::to_json`] is).
    pub fn sign_bytes(&self, doc_json: &str) -> Vec<u8> {
        let sig = self.pair.sign(doc_json.as_bytes());
        let envelope = Envelope {
            alg: ALG.to_string(),
            key_id: self.public.key_id(),
            doc: doc_json.to_string(),
            sig: hex::encode(sig.as_ref()),
        };
        // Serializing plain strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// The signed payload of `doc`.
    pub fn sign(&self, doc: &ConfigDocument) -> Vec<u8> {
        let json = doc.to_json();
        // `to_json` is serde_json output: always UTF-8.
        self.sign_bytes(&String::from_utf8_lossy(&json))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    alg: String,
    key_id: String,
    doc: String,
    sig: String,
}

/// Why a payload is not a document signed by a trusted key. The messages are the reasons the
/// agent acks and logs.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("signed config of {0} bytes exceeds the limit of {MAX_SIGNED_BYTES} bytes")]
    TooLarge(usize),
    #[error("no trusted relay keys configured; set remote_config.trusted_keys")]
    NoTrustedKeys,
    #[error("unsigned config document refused: only documents signed by a trusted relay key are applied")]
    Unsigned,
    #[error("not a signed config envelope: {0}")]
    Envelope(String),
    #[error("signature algorithm {0:?} is not supported (only {ALG})")]
    Algorithm(String),
    #[error("signed by unknown key {key_id:?}; trusted key ids: {trusted:?}")]
    UnknownKey {
        key_id: String,
        trusted: Vec<String>,
    },
    #[error("bad signature: the document does not verify with key {0}")]
    BadSignature(String),
    #[error(transparent)]
    Document(#[from] ConfigDocError),
}

/// Why a signature's `alg` and `key_id` name no trusted key (the texts cut to 40 characters).
enum KeyLookup {
    Algorithm(String),
    Unknown {
        key_id: String,
        trusted: Vec<String>,
    },
}

/// The trusted key a signature names: only [`ALG`], and the key id among `trusted`.
fn trusted_key<'k>(
    alg: &str,
    key_id: &str,
    trusted: &'k [PublicKey],
) -> Result<&'k PublicKey, KeyLookup> {
    if alg != ALG {
        return Err(KeyLookup::Algorithm(alg.chars().take(40).collect()));
    }
    trusted
        .iter()
        .find(|k| k.key_id() == key_id)
        .ok_or_else(|| KeyLookup::Unknown {
            key_id: key_id.chars().take(40).collect(),
            trusted: trusted.iter().map(PublicKey::key_id).collect(),
        })
}

/// Checks `payload` is an envelope signed by one of `trusted` over exactly its document's
/// bytes, then parses and range-checks the document.
pub fn verify(payload: &[u8], trusted: &[PublicKey]) -> Result<ConfigDocument, SignedError> {
    if payload.len() > MAX_SIGNED_BYTES {
        return Err(SignedError::TooLarge(payload.len()));
    }
    let doc = verify_envelope(payload, trusted)?;
    Ok(ConfigDocument::from_json(doc.as_bytes())?)
}

/// Checks `payload` is an envelope signed by one of `trusted` and returns the document text it
/// signs, unparsed: for documents other than config ([`crate::rollout`]), which check their
/// own size first and parse it themselves. Each document type refuses the others' fields
/// (`deny_unknown_fields`), so one signed by the same key cannot be taken for another.
pub fn verify_envelope(payload: &[u8], trusted: &[PublicKey]) -> Result<String, SignedError> {
    if trusted.is_empty() {
        return Err(SignedError::NoTrustedKeys);
    }
    let envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            // A bare document (what an old relay, or anyone on the broker, would publish).
            let bare = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.as_object().map(|o| o.contains_key("version")))
                .unwrap_or(false);
            return Err(if bare {
                SignedError::Unsigned
            } else {
                SignedError::Envelope(e.to_string())
            });
        }
    };
    let key = trusted_key(&envelope.alg, &envelope.key_id, trusted).map_err(|e| match e {
        KeyLookup::Algorithm(alg) => SignedError::Algorithm(alg),
        KeyLookup::Unknown { key_id, trusted } => SignedError::UnknownKey { key_id, trusted },
    })?;
    let sig = hex::decode(&envelope.sig).unwrap_or_default();
    if !key.verifies(envelope.doc.as_bytes(), &sig) {
        return Err(SignedError::BadSignature(key.key_id()));
    }
    Ok(envelope.doc)
}

/// Signatures of model manifests: a detached `<manifest>.sig` file beside the manifest, a
/// small JSON object `{"alg":"ed25519","key_id":"…","sig":"…"}` over the manifest file's exact
/// bytes, prefixed with [`MODEL_SIGNATURE_CONTEXT`] so a model-release signature can never be
/// taken for a config signature (or the other way round) even if one key signed both. The
/// manifest pins the ONNX file by sha256, so the signature covers the model too.
pub const MODEL_SIGNATURE_CONTEXT: &[u8] = b"tierd model manifest v1\0";

/// The largest `.sig` file read.
pub const MAX_MODEL_SIGNATURE_BYTES: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachedSignature {
    alg: String,
    key_id: String,
    sig: String,
}

fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MODEL_SIGNATURE_CONTEXT.len() + manifest.len());
    m.extend_from_slice(MODEL_SIGNATURE_CONTEXT);
    m.extend_from_slice(manifest);
    m
}

impl Signer {
    /// The `.sig` file's text for a manifest's bytes (one JSON line).
    pub fn sign_manifest(&self, manifest: &[u8]) -> String {
        let sig = self.pair.sign(&manifest_message(manifest));
        let detached = DetachedSignature {
            alg: ALG.to_string(),
            key_id: self.public.key_id(),
            sig: hex::encode(sig.as_ref()),
        };
        let mut text = serde_json::to_string(&detached).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// Why a model manifest's signature does not hold.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ModelSignatureError {
    #[error("the signature file is {0} bytes, more than {MAX_MODEL_SIGNATURE_BYTES}")]
    TooLarge(usize),
    #[error("not a model signature: {0}")]
    Format(String),
    #[error("signature algorithm {0:?} is not supported (only {ALG})")]
    Algorithm(String),
    #[error("signed by unknown key {key_id:?}; trusted model key ids: {trusted:?}")]
    UnknownKey {
        key_id: String,
        trusted: Vec<String>,
    },
    #[error("bad signature: the manifest does not verify with key {0} (changed after signing?)")]
    BadSignature(String),
}

/// Checks a `.sig` file's text against the manifest's exact bytes and the trusted model keys;
/// returns the key that signed it.
pub fn verify_manifest<'k>(
    signature: &[u8],
    manifest: &[u8],
    trusted: &'k [PublicKey],
) -> Result<&'k PublicKey, ModelSignatureError> {
    if signature.len() > MAX_MODEL_SIGNATURE_BYTES {
        return Err(ModelSignatureError::TooLarge(signature.len()));
    }
    let d: DetachedSignature = serde_json::from_slice(signature)
        .map_err(|e| ModelSignatureError::Format(e.to_string()))?;
    let key = trusted_key(&d.alg, &d.key_id, trusted).map_err(|e| match e {
        KeyLookup::Algorithm(alg) => ModelSignatureError::Algorithm(alg),
        KeyLookup::Unknown { key_id, trusted } => {
            ModelSignatureError::UnknownKey { key_id, trusted }
        }
    })?;
    let sig = hex::decode(&d.sig).unwrap_or_default();
    if !key.verifies(&manifest_message(manifest), &sig) {
        return Err(ModelSignatureError::BadSignature(key.key_id()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn signer() -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8().expect("generate")).expect("pkcs8")
    }

    fn doc(version: u64) -> ConfigDocument {
        ConfigDocument {
            version,
            epoch: 0,
            device_id: "pi-1".into(),
            issued_ms: 1,
            source: "operator".into(),
            settings: Settings {
                threshold: Some(0.9),
                ..Default::default()
            },
            certificate: None,
        }
    }

    #[test]
    fn manifest_signatures_cover_the_exact_bytes_and_not_config_documents() {
        let s = signer();
        let manifest = b"name = \"m\"\nversion = \"1\"\n";
        let sig = s.sign_manifest(manifest);
        let trusted = [s.public().clone()];
        assert_eq!(
            verify_manifest(sig.as_bytes(), manifest, &trusted),
            Ok(s.public())
        );
        let mut changed = manifest.to_vec();
        changed[8] = b'n';
        assert!(matches!(
            verify_manifest(sig.as_bytes(), &changed, &trusted),
            Err(ModelSignatureError::BadSignature(_))
        ));
        let other = signer();
        assert!(matches!(
            verify_manifest(sig.as_bytes(), manifest, &[other.public().clone()]),
            Err(ModelSignatureError::UnknownKey { .. })
        ));
        assert!(matches!(
            verify_manifest(b"{}", manifest, &trusted),
            Err(ModelSignatureError::Format(_))
        ));
        // A config signature over the same bytes is not a manifest signature (the context).
        let config_sig = s.pair.sign(manifest);
        let forged = format!(
            r#"{{"alg":"ed25519","key_id":"{}","sig":"{}"}}"#,
            s.public().key_id(),
            hex::encode(config_sig.as_ref())
        );
        assert!(matches!(
            verify_manifest(forged.as_bytes(), manifest, &trusted),
            Err(ModelSignatureError::BadSignature(_))
        ));
    }

    #[test]
    fn signed_documents_verify_and_public_keys_round_trip() {
        let s = signer();
        let text = s.public().to_string();
        assert!(text.starts_with(PUBLIC_KEY_PREFIX) && text.len() == 14 + 64);
        let parsed: PublicKey = text.parse().expect("parse");
        assert_eq!(&parsed, s.public());
        let payload = s.sign(&doc(7));
        assert_eq!(verify(&payload, &[parsed]), Ok(doc(7)));
        // Any of several trusted keys (rotation).
        let other = signer();
        assert_eq!(
            verify(&payload, &[other.public().clone(), s.public().clone()]),
            Ok(doc(7))
        );
    }

    #[test]
    fn refuses_with_the_reason() {
        let s = signer();
        let trusted = [s.public().clone()];
        let payload = s.sign(&doc(7));
        // Unsigned, no keys, another key.
        assert_eq!(
            verify(&doc(7).to_json(), &trusted),
            Err(SignedError::Unsigned)
        );
        assert_eq!(verify(&payload, &[]), Err(SignedError::NoTrustedKeys));
        let forged = signer().sign(&doc(8));
        assert!(matches!(
            verify(&forged, &trusted),
            Err(SignedError::UnknownKey { .. })
        ));
        // The bytes changed after signing (a different threshold, same key id and signature).
        let text = String::from_utf8(payload.clone()).expect("utf8");
        let tampered = text.replace("0.9", "0.0");
        assert_ne!(tampered, text);
        assert!(matches!(
            verify(tampered.as_bytes(), &trusted),
            Err(SignedError::BadSignature(_))
        ));
        // Same document semantics, different bytes (whitespace): still refused.
        let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        let spaced = format!("{} ", v["doc"].as_str().expect("doc"));
        v["doc"] = serde_json::Value::String(spaced);
        assert!(matches!(
            verify(&serde_json::to_vec(&v).expect("json"), &trusted),
            Err(SignedError::BadSignature(_))
        ));
        // Unknown envelope field, wrong algorithm, oversized, garbage.
        let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        v["extra"] = serde_json::json!(1);
        let err = verify(&serde_json::to_vec(&v).expect("json"), &trusted).unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
        let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        v["alg"] = serde_json::json!("none");
        assert!(matches!(
            verify(&serde_json::to_vec(&v).expect("json"), &trusted),
            Err(SignedError::Algorithm(_))
        ));
        assert!(matches!(
            verify(&vec![b' '; MAX_SIGNED_BYTES + 1], &trusted),
            Err(SignedError::TooLarge(_))
        ));
        assert!(matches!(
            verify(b"garbage", &trusted),
            Err(SignedError::Envelope(_))
        ));
        // A validly signed but invalid document is refused for its content.
        let bad = s.sign_bytes(r#"{"version":3,"device_id":"pi-1","settings":{"threshold":7}}"#);
        let err = verify(&bad, &trusted).unwrap_err().to_string();
        assert!(err.contains("threshold = 7"), "{err}");
    }

    #[test]
    fn key_texts_and_pkcs8_are_checked() {
        for bad in [
            "",
            "tierd-ed25519:",
            "tierd-ed25519:zz",
            "ed25519:00",
            &format!("tierd-ed25519:{}", "0".repeat(66)),
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
        assert!(matches!(
            Signer::from_pkcs8(b"not a key"),
            Err(KeyError::Pkcs8(_))
        ));
    }
}

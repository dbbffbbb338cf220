//! The config-signing key of this test process: one key for every relay the suites start
//! (written into each relay's state directory, so replicas share it, as in production), and
//! pinned by every agent ([`crate::AgentOptions`] writes it to `[remote_config] trusted_keys`).

use std::path::Path;
use std::sync::OnceLock;

use tierd_protocol::{ConfigDocument, PublicKey, Signer};

/// The key file's name in a relay's state directory (what `cloud-relay` loads).
pub const KEY_FILE: &str = "config-signing-key.pk8";

fn pkcs8() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| Signer::generate_pkcs8().expect("cannot generate the test relay key"))
}

/// The relays' signer (the same key every relay of this process signs with).
pub fn relay_signer() -> Signer {
    Signer::from_pkcs8(pkcs8()).expect("the test relay key is PKCS#8")
}

/// The relays' public key, as agents pin it.
pub fn relay_public_key() -> PublicKey {
    relay_signer().public().clone()
}

/// A key no agent trusts.
pub fn stranger_signer() -> Signer {
    let pkcs8 = Signer::generate_pkcs8().expect("cannot generate a key");
    Signer::from_pkcs8(&pkcs8).expect("PKCS#8")
}

/// Writes the relays' key into `state_dir` (mode 0600), as `cloud-relay keygen` would.
pub fn install_relay_key(state_dir: &Path) {
    std::fs::create_dir_all(state_dir).expect("cannot create the relay state dir");
    let path = state_dir.join(KEY_FILE);
    std::fs::write(&path, pkcs8()).expect("cannot write the relay key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600 the relay key");
    }
}

/// `doc_json` signed by the relays' key: what a relay would publish.
pub fn sign_json(doc_json: &str) -> Vec<u8> {
    relay_signer().sign_bytes(doc_json)
}

/// `doc` signed by the relays' key.
pub fn sign(doc: &ConfigDocument) -> Vec<u8> {
    relay_signer().sign(doc)
}

/// The document inside a signed payload (e.g. `applied-config.json`), as JSON.
pub fn inner_document(payload: &[u8]) -> serde_json::Value {
    let envelope: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "not a signed envelope ({e}): {}",
            String::from_utf8_lossy(payload)
        )
    });
    let doc = envelope["doc"].as_str().unwrap_or_else(|| {
        panic!(
            "no `doc` string in the envelope: {}",
            String::from_utf8_lossy(payload)
        )
    });
    serde_json::from_str(doc).unwrap_or_else(|e| panic!("the signed doc is not JSON ({e}): {doc}"))
}

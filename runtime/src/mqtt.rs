//! The MQTT connection both daemons open: options, TLS, and reconnect backoff.
//!
//! Settings that matter for latency are fixed here rather than left to each caller:
//! TCP_NODELAY is on (without it a request/response over loopback takes 44–88 ms of Nagle and
//! delayed-ACK time instead of ~0.1 ms), and the incoming packet size is capped so a rogue
//! publisher cannot make us buffer megabytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use thiserror::Error;

/// Largest MQTT packet we accept or send. Escalation requests are capped at 64 KiB by the codec.
pub const MAX_PACKET_BYTES: u32 = 256 * 1024;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Defaults to a name derived from the daemon and its id.
    pub client_id: Option<String>,
    pub keep_alive_s: u64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// File holding the password (read at start, surrounding whitespace trimmed). A relative path
    /// is relative to the config file's folder; a bare name with `$CREDENTIALS_DIRECTORY` set
    /// (systemd `LoadCredential=`) is looked up there.
    pub password_file: Option<PathBuf>,
    /// Accept a non-loopback broker with neither TLS nor credentials (default false: refused).
    pub allow_insecure: bool,
    /// PEM CA bundle; setting it turns TLS on (rustls with the ring provider).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key for mutual TLS (both or neither). A bare
    /// `client_key_file` name with `$CREDENTIALS_DIRECTORY` set is looked up there, like
    /// `password_file`.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            keep_alive_s: 30,
            username: None,
            password: None,
            password_file: None,
            allow_insecure: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum MqttSetupError {
    #[error("mqtt: {0}")]
    Invalid(String),
    #[error("mqtt: {0}")]
    Secret(#[from] crate::config::SecretError),
    #[error("mqtt: {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("mqtt: TLS setup failed: {0}")]
    Tls(String),
}

impl MqttConfig {
    /// Range and consistency checks; the message names the key.
    pub fn validate(&self) -> Result<(), MqttSetupError> {
        let bad = |s: &str| Err(MqttSetupError::Invalid(s.to_owned()));
        if self.host.is_empty() {
            return bad("mqtt.host is empty");
        }
        if self.port == 0 {
            return bad("mqtt.port must not be 0");
        }
        if !(5..=3600).contains(&self.keep_alive_s) {
            return bad("mqtt.keep_alive_s must be within [5, 3600]");
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return bad("mqtt.client_cert_file and mqtt.client_key_file go together");
        }
        if self.client_cert_file.is_some() && self.ca_file.is_none() {
            return bad("mqtt.client_cert_file needs mqtt.ca_file (TLS)");
        }
        if self.username.is_none() && self.password.is_some() {
            return bad("mqtt.password given without mqtt.username");
        }
        if self.username.is_none() && self.password_file.is_some() {
            return bad("mqtt.password_file given without mqtt.username");
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad("mqtt.password and mqtt.password_file are exclusive");
        }
        if !self.allow_insecure
            && !is_loopback_host(&self.host)
            && self.ca_file.is_none()
            && self.username.is_none()
        {
            return Err(MqttSetupError::Invalid(format!(
                "mqtt.host {:?} is not a loopback address and neither mqtt.ca_file (TLS) nor \
                 mqtt.username with mqtt.password/mqtt.password_file is set: anyone on the path \
                 could read and steer this daemon; configure them, or set \
                 mqtt.allow_insecure = true",
                self.host
            )));
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 128 {
                return bad("mqtt.client_id must be 1-128 bytes");
            }
        }
        Ok(())
    }

    /// Makes relative file paths relative to `base` (the config file's folder); a bare
    /// `password_file` name goes to `$CREDENTIALS_DIRECTORY` when that is set.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        self.resolve_paths_with(base, credentials.as_deref());
    }

    /// [`MqttConfig::resolve_paths`] with the credentials directory given.
    pub fn resolve_paths_with(&mut self, base: &Path, credentials_dir: Option<&Path>) {
        // Secrets may be systemd credentials: a bare name is looked up there.
        for p in [&mut self.password_file, &mut self.client_key_file]
            .into_iter()
            .flatten()
        {
            let bare = p.components().count() == 1
                && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
            match credentials_dir {
                Some(dir) if bare && !dir.as_os_str().is_empty() => *p = dir.join(&*p),
                _ if p.is_relative() => *p = base.join(&*p),
                _ => {}
            }
        }
        for p in [&mut self.ca_file, &mut self.client_cert_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Builds MQTT v5 options. TLS material is read and parsed now, so a bad file fails at start.
    pub fn options(&self, default_client_id: &str) -> Result<MqttOptions, MqttSetupError> {
        self.validate()?;
        let id = self.client_id.as_deref().unwrap_or(default_client_id);
        let mut o = MqttOptions::new(id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        o.set_max_packet_size(Some(MAX_PACKET_BYTES));
        o.set_connection_timeout(5);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.read_password()?);
        }
        if let Some(ca) = &self.ca_file {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(self.tls_config(ca)?),
            )));
        }
        Ok(o)
    }

    /// The password: `password`, else the content of `password_file` (trimmed), else empty.
    fn read_password(&self) -> Result<String, MqttSetupError> {
        let Some(path) = &self.password_file else {
            return Ok(self.password.clone().unwrap_or_default());
        };
        Ok(crate::config::read_secret(path, "mqtt.password_file")?)
    }

    fn tls_config(&self, ca: &PathBuf) -> Result<rustls::ClientConfig, MqttSetupError> {
        let pem_err = |path: &PathBuf, e: rustls::pki_types::pem::Error| MqttSetupError::Pem {
            path: path.clone(),
            reason: e.to_string(),
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| pem_err(ca, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(ca, e))?;
        if certs.is_empty() {
            return Err(MqttSetupError::Pem {
                path: ca.clone(),
                reason: "no certificate found".into(),
            });
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| MqttSetupError::Tls(e.to_string()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots);
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| pem_err(cert, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_err(cert, e))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| MqttSetupError::Tls(e.to_string()))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// True for `localhost` and loopback IP literals (127.0.0.0/8, ::1).
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sends DISCONNECT and drives the event loop until the broker closes the connection (at most
/// 1 s), so the broker drops the session promptly and does not publish our last will.
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    // Keep reading until the broker closes the connection after our DISCONNECT. Closing our
    // side first, with a PUBACK still unread, makes the kernel send RST, which can discard the
    // DISCONNECT at the broker before it is read: the broker then publishes our last will
    // ("connection lost") although we stopped cleanly. Seen in the Mosquitto status test.
    let _ = tokio::time::timeout(Duration::from_millis(1000), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Installs ring as the process-wide rustls provider. Call once at start: with no provider
/// installed rustls panics at the first TLS connect.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Jittered exponential backoff for reconnects; rumqttc retries immediately on its own.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9)
            | 1;
        Backoff {
            base,
            cap,
            attempt: 0,
            state: seed,
        }
    }

    /// The next delay: uniform in [d/2, d] where d = min(cap, base * 2^attempt) ("equal jitter"),
    /// so a fleet that lost the same broker does not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let frac = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        exp.mul_f64(0.5 + 0.5 * frac)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let d: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        for x in &d[8..] {
            assert!(*x >= Duration::from_millis(2500) && *x <= Duration::from_secs(5));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = MqttConfig::default();
        assert!(c.validate().is_ok());
        c.password = Some("x".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mqtt.password"));
        let c = MqttConfig {
            client_cert_file: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("client_key_file"));
    }

    #[test]
    fn a_remote_broker_without_tls_or_credentials_is_refused() {
        let remote = MqttConfig {
            host: "broker.example.net".into(),
            ..Default::default()
        };
        let err = remote.validate().unwrap_err().to_string();
        for key in ["mqtt.ca_file", "mqtt.username", "mqtt.allow_insecure"] {
            assert!(err.contains(key), "{err}");
        }
        assert!(!err.contains('\n'), "one line: {err}");
        for ok in [
            MqttConfig {
                allow_insecure: true,
                ..remote.clone()
            },
            MqttConfig {
                ca_file: Some("ca.pem".into()),
                ..remote.clone()
            },
            MqttConfig {
                username: Some("u".into()),
                password: Some("p".into()),
                ..remote.clone()
            },
        ] {
            assert!(ok.validate().is_ok(), "{ok:?}");
        }
        for host in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"] {
            let c = MqttConfig {
                host: host.into(),
                ..Default::default()
            };
            assert!(c.validate().is_ok(), "{host}");
        }
        for host in ["10.0.0.5", "0.0.0.0", "::"] {
            let c = MqttConfig {
                host: host.into(),
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{host}");
        }
    }

    #[test]
    fn password_file_is_read_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(dir.path().join("pw"), "from-config-dir\n").unwrap();
        std::fs::write(creds.join("pw"), "from-credentials\n").unwrap();
        let with = |file: &str| MqttConfig {
            username: Some("u".into()),
            password_file: Some(file.into()),
            ..Default::default()
        };
        let mut c = with("pw");
        c.resolve_paths_with(dir.path(), None);
        assert_eq!(
            c.password_file.as_deref(),
            Some(dir.path().join("pw").as_path())
        );
        assert_eq!(c.read_password().unwrap(), "from-config-dir");
        let mut c = with("pw");
        c.resolve_paths_with(dir.path(), Some(&creds));
        assert_eq!(c.read_password().unwrap(), "from-credentials");
        assert!(c.options("x").is_ok());
        // Not a bare name: relative to the config folder even with a credentials directory.
        let mut c = with("./pw");
        c.resolve_paths_with(dir.path(), Some(&creds));
        assert_eq!(c.read_password().unwrap(), "from-config-dir");
        let mut c = with("missing");
        c.resolve_paths_with(dir.path(), None);
        assert!(c.options("x").unwrap_err().to_string().contains("missing"));
        // The client key is a credential too; the certificate and CA are not secrets.
        let mut c = MqttConfig {
            ca_file: Some("ca.crt".into()),
            client_cert_file: Some("dev.crt".into()),
            client_key_file: Some("dev.key".into()),
            ..Default::default()
        };
        c.resolve_paths_with(dir.path(), Some(&creds));
        assert_eq!(c.client_key_file, Some(creds.join("dev.key")));
        assert_eq!(c.client_cert_file, Some(dir.path().join("dev.crt")));
        assert_eq!(c.ca_file, Some(dir.path().join("ca.crt")));
        let both = MqttConfig {
            password: Some("p".into()),
            ..with("pw")
        };
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("exclusive"));
        let no_user = MqttConfig {
            username: None,
            ..with("pw")
        };
        assert!(no_user
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mqtt.password_file"));
    }

    #[test]
    fn bad_ca_file_fails_at_setup() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let c = MqttConfig {
            ca_file: Some(ca),
            ..Default::default()
        };
        let err = c.options("x").unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
        let c = MqttConfig {
            ca_file: Some(dir.path().join("missing.pem")),
            ..Default::default()
        };
        assert!(c.options("x").is_err());
    }
}

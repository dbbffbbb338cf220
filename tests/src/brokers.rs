//! The brokers under test: the relay's embedded one (chosen with [`RelayBroker`]) or a real
//! Mosquitto started for the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::fixtures::{repo_root, READY_TIMEOUT, SKIP_MOSQUITTO_ENV};
use crate::processes::Proc;
use tierd_devkit::port_accepts;

/// Where a relay gets its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayBroker {
    /// Embed rumqttd on a free port.
    Embedded,
    /// Join the broker at 127.0.0.1:`port` (`[mqtt]` section).
    External(u16),
}

/// Overrides where the Mosquitto binary is looked for (a path; if it is not a file, Mosquitto
/// counts as not installed).
pub const MOSQUITTO_BIN_ENV: &str = "TIERD_MOSQUITTO";

/// The Mosquitto broker binary, if installed: `$TIERD_MOSQUITTO`, else `/usr/sbin/mosquitto`, else
/// `mosquitto` on `PATH`.
pub fn mosquitto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(MOSQUITTO_BIN_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let standard = PathBuf::from("/usr/sbin/mosquitto");
    if standard.is_file() {
        return Some(standard);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    })
}

/// A running Mosquitto with a throwaway config; logs everything (including each PUBLISH it sends,
/// so tests can see which client got what).
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

/// Starts Mosquitto on 127.0.0.1:`port` and waits until it accepts connections.
///
/// Returns `None` (after printing a note) only when Mosquitto is not installed and
/// `TIERD_SKIP_MOSQUITTO=1`; without that variable a missing Mosquitto fails the test.
pub async fn start_mosquitto(port: u16) -> Option<Mosquitto> {
    let binary = mosquitto_or_skip()?;
    let dir = mosquitto_dir();
    let conf = format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         {LOG_ALL}"
    );
    Some(spawn_mosquitto(binary, dir, &conf, port).await)
}

/// Starts Mosquitto on `port` with `conf` (listener and security lines; logging is appended)
/// and waits until it accepts connections. The files it names must be readable by the
/// `mosquitto` user when run as root.
pub async fn start_mosquitto_conf(port: u16, conf: &str) -> Option<Mosquitto> {
    let binary = mosquitto_or_skip()?;
    let dir = mosquitto_dir();
    let conf = format!(
        "{conf}
{LOG_ALL}"
    );
    Some(spawn_mosquitto(binary, dir, &conf, port).await)
}

/// Logging appended to every test broker's config.
const LOG_ALL: &str = "log_dest stderr\nlog_type all\nconnection_messages true\n";

/// Where the shipped config expects its files (`cross/mosquitto/mosquitto.conf`).
const SHIPPED_DIR: &str = "/etc/mosquitto/tierd/";

/// The shipped production config (`cross/mosquitto/mosquitto.conf` and `acl`), rewritten only
/// where it must be: the files' folder becomes `files`, and `listener 8883` becomes
/// `listener {port} 127.0.0.1`; logging is appended. Panics if the shipped text changed so
/// that the rewrite no longer applies.
pub fn shipped_mosquitto_conf(files: &Path, port: u16) -> String {
    let shipped = std::fs::read_to_string(repo_root().join("cross/mosquitto/mosquitto.conf"))
        .expect("cannot read cross/mosquitto/mosquitto.conf");
    assert!(
        shipped.contains(SHIPPED_DIR) && shipped.lines().any(|l| l == "listener 8883"),
        "cross/mosquitto/mosquitto.conf no longer has {SHIPPED_DIR} paths and `listener 8883`"
    );
    let dir = format!("{}/", files.display());
    let conf: String = shipped
        .lines()
        .map(|l| {
            if l == "listener 8883" {
                format!("listener {port} 127.0.0.1\n")
            } else {
                format!("{}\n", l.replace(SHIPPED_DIR, &dir))
            }
        })
        .collect();
    format!("{conf}\n{LOG_ALL}")
}

/// Starts Mosquitto with the shipped TLS config and ACL on 127.0.0.1:`port`. `files` must hold
/// `ca.crt`, `broker.crt` and `broker.key` (see [`Pki`]); the ACL is copied beside them.
pub async fn start_mosquitto_shipped(port: u16, files: &Path) -> Option<Mosquitto> {
    let binary = mosquitto_or_skip()?;
    let acl = std::fs::read_to_string(repo_root().join("cross/mosquitto/acl"))
        .expect("cannot read cross/mosquitto/acl");
    std::fs::write(files.join("acl"), acl).expect("cannot write the acl");
    // Run as root, Mosquitto drops to the `mosquitto` user before it reads the key, as in
    // production: the throwaway test files must be readable by it.
    for f in ["acl", "ca.crt", "broker.crt", "broker.key"] {
        chmod(&files.join(f), 0o644);
    }
    chmod(files, 0o755);
    let dir = mosquitto_dir();
    let conf = shipped_mosquitto_conf(files, port);
    Some(spawn_mosquitto(binary, dir, &conf, port).await)
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn mosquitto_or_skip() -> Option<PathBuf> {
    let Some(binary) = mosquitto_binary() else {
        if std::env::var(SKIP_MOSQUITTO_ENV).as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: mosquitto is not installed and {SKIP_MOSQUITTO_ENV}=1; \
                 this Mosquitto test did not run"
            );
            return None;
        }
        panic!(
            "mosquitto is not installed (looked at ${MOSQUITTO_BIN_ENV} if set, else \
             /usr/sbin/mosquitto and PATH): `apt-get install mosquitto`, \
             or set {SKIP_MOSQUITTO_ENV}=1 to skip these tests"
        );
    };
    Some(binary)
}

fn mosquitto_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("tierd-mosquitto-")
        .tempdir()
        .expect("cannot create a temp dir")
}

async fn spawn_mosquitto(binary: PathBuf, dir: TempDir, conf: &str, port: u16) -> Mosquitto {
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("cannot write mosquitto.conf");
    let mut cmd = Command::new(binary);
    cmd.arg("-c").arg(&conf_path);
    let mut proc = Proc::spawn("mosquitto", cmd, &dir.path().join("mosquitto.log"));
    let start = Instant::now();
    while !port_accepts(port) {
        proc.assert_running("starting");
        if start.elapsed() > READY_TIMEOUT {
            panic!(
                "mosquitto does not accept connections on port {port} after {READY_TIMEOUT:?}; its log:\n{}",
                proc.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Mosquitto {
        proc,
        port,
        _dir: dir,
    }
}

/// A throwaway PKI made with the `openssl` CLI (P-256 keys), as `cross/mosquitto/README.md`
/// tells an operator to make one: a CA, then leaf certificates it signs.
pub struct Pki {
    pub dir: PathBuf,
    /// File stem of the CA (`{stem}.crt`, `{stem}.key`).
    ca: String,
}

/// `openssl req` arguments for a request with a new P-256 key, unencrypted.
const NEW_P256_KEY: [&str; 7] = [
    "req",
    "-new",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl Pki {
    /// A new CA `{name}.crt`/`{name}.key` in `dir` (created if missing).
    pub fn new_ca(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).expect("cannot create the PKI folder");
        openssl(
            dir,
            &[
                &NEW_P256_KEY[..],
                &[
                    "-x509",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.crt"),
                    "-subj",
                    &format!("/CN={name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        Pki {
            dir: dir.to_path_buf(),
            ca: name.to_owned(),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.ca))
    }

    /// A broker certificate `{stem}.crt`/`{stem}.key` for the given subjectAltName value
    /// (e.g. `IP:127.0.0.1,DNS:localhost`).
    pub fn broker(&self, stem: &str, san: &str) -> (PathBuf, PathBuf) {
        self.leaf(
            stem,
            "tierd-broker",
            &format!("extendedKeyUsage=serverAuth\nsubjectAltName={san}"),
        )
    }

    /// A client certificate `{stem}.crt`/`{stem}.key` with CN `cn` (a device id, or
    /// `tierd-relay`).
    pub fn client(&self, stem: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.leaf(stem, cn, "extendedKeyUsage=clientAuth")
    }

    fn leaf(&self, stem: &str, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        let (key, csr, crt, extfile) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.crt"),
            format!("{stem}.ext"),
        );
        std::fs::write(
            self.dir.join(&extfile),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}\n"
            ),
        )
        .expect("cannot write the extension file");
        openssl(
            &self.dir,
            &[
                &NEW_P256_KEY[..],
                &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")],
            ]
            .concat(),
        );
        let (ca_crt, ca_key) = (format!("{}.crt", self.ca), format!("{}.key", self.ca));
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &extfile,
            ],
        );
        (self.dir.join(crt), self.dir.join(key))
    }
}

/// Runs `openssl args…` in `dir`; panics with its stderr if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Mosquitto {
    /// Waits until Mosquitto has acknowledged a subscription from `client_id`
    /// (e.g. `cloud-relay-r1`, `edge-agent-dev-1`).
    pub async fn wait_for_suback(&mut self, client_id: &str) {
        self.proc
            .wait_for_log(&format!("Sending SUBACK to {client_id}"), READY_TIMEOUT)
            .await;
    }

    /// How many PUBLISH packets on a topic containing `topic_part` Mosquitto sent to `client_id`.
    pub fn publishes_sent_to(&self, client_id: &str, topic_part: &str) -> usize {
        let prefix = format!("Sending PUBLISH to {client_id} ");
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains(&prefix) && l.contains(topic_part))
            .count()
    }
}

//! A throwaway PostgreSQL server: `initdb` into a temp dir, `postgres` on a free loopback port
//! (Unix socket in the same dir), one database `tierd`; stopped when dropped.
//!
//! The binaries are Debian's (`/usr/lib/postgresql/<major>/bin`, package `postgresql`, which
//! `scripts/install-test-deps` installs). PostgreSQL refuses to run as root: as root the
//! cluster belongs to the `postgres` user the package creates, and its commands run through
//! `setpriv` (which execs, so killing the process kills the server itself).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::processes::{free_port, Proc};

/// `TIERD_SKIP_POSTGRES=1`: suites skip (with a note) when PostgreSQL is not installed;
/// without it a missing PostgreSQL fails them.
pub const SKIP_POSTGRES_ENV: &str = "TIERD_SKIP_POSTGRES";

/// The directory of `initdb` and `postgres`: the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p)
}

/// A running PostgreSQL.
pub struct Postgres {
    pub proc: Proc,
    pub port: u16,
    /// `postgres://tierd@127.0.0.1:{port}/tierd`
    pub url: String,
    _dir: TempDir,
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
}

/// `program` with `args`, as the `postgres` user when we are root.
fn pg_command(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

impl Postgres {
    /// Starts a fresh cluster; `None` (after a note) only when PostgreSQL is missing and
    /// `TIERD_SKIP_POSTGRES=1`.
    pub async fn start() -> Option<Postgres> {
        let Some(bin) = postgres_bin_dir() else {
            if std::env::var_os(SKIP_POSTGRES_ENV).is_some() {
                eprintln!("note: PostgreSQL not installed; skipped ({SKIP_POSTGRES_ENV}=1)");
                return None;
            }
            panic!(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run \
                 scripts/install-test-deps, or set {SKIP_POSTGRES_ENV}=1 to skip"
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("tierd-pg-")
            .tempdir()
            .expect("cannot create a temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("cannot create the data dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot chown {} to postgres", dir.path().display());
        }
        let out = pg_command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "tierd", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("cannot run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = pg_command(&bin, "postgres");
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off", "-c", "max_connections=50"]);
        let mut proc = Proc::spawn("postgres", cmd, &dir.path().join("postgres.log"));
        let start = Instant::now();
        while !proc.log().contains("ready to accept connections") {
            proc.assert_running("starting");
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postgres not ready in 30 s:\n{}",
                proc.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = pg_command(&bin, "createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "tierd",
                "tierd",
            ])
            .output()
            .expect("cannot run createdb");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Postgres {
            proc,
            port,
            url: format!("postgres://tierd@127.0.0.1:{port}/tierd"),
            _dir: dir,
        })
    }
}

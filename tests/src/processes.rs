//! Spawning and stopping the real binaries: each child's output goes to a log file, it is killed
//! when its guard drops, and a panicking test prints the tail of every log.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::RUST_LOG;

/// A workspace binary built next to the running test executable
/// (`target/debug/deps/e2e-…` → `target/debug/edge-agent`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a folder")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
         (the end-to-end tests run the built binaries)",
        path.display()
    );
    path
}

/// A TCP port that was free a moment ago on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    // The kernel may hand the same free port to two quick calls (a relay's broker and HTTP
    // ports once collided): never give one out twice in this process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = tierd_devkit::free_port().expect("cannot bind 127.0.0.1:0");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running child process whose stdout and stderr go to a log file. Killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let log = File::create(log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log2 = log
            .try_clone()
            .expect("cannot duplicate the log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self, doing: &str) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited ({status}) while {doing}; its log:\n{}",
                self.name,
                self.log_tail(60)
            );
        }
    }

    /// Waits until the log contains `needle` `count` times; panics on timeout or exit.
    pub async fn wait_for_log_count(&mut self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            self.assert_running(&format!("waiting for {needle:?} in its log"));
            if start.elapsed() > timeout {
                panic!(
                    "{} did not log {needle:?} (x{count}) within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the log contains `needle`; panics on timeout or exit.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout).await;
    }

    /// Kills the process (SIGKILL: a crash, no goodbye) and reaps it.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM, then waits at most `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself; kills it and panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exit_status() {
                return s;
            }
            if start.elapsed() > timeout {
                self.kill();
                panic!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log tail -----\n{}\n----- end of {} log -----",
                self.name,
                self.child.id(),
                self.log_tail(40),
                self.name
            );
        }
    }
}

/// A daemon command with the test environment applied.
pub fn daemon_command(binary: &str) -> Command {
    let mut cmd = Command::new(bin_path(binary));
    cmd.env("RUST_LOG", RUST_LOG)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG_STYLE");
    cmd
}

/// Resident memory of a process, from /proc (bytes).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

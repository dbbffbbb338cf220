//! systemd integration over the `sd_notify` protocol (`$NOTIFY_SOCKET`), through the `sd-notify`
//! crate. Outside systemd every call is a no-op, so the daemons run the same everywhere.
//!
//! The watchdog is fed only after a caller-supplied self-check passes (the model still answers
//! its golden vectors, the event loops are still running), never by a free-running timer: a
//! timer proves only that the runtime is alive, not that the daemon can still do its job.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{debug, warn};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with a status line: call once everything that can fail at start has succeeded.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A `STATUS=` line shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`: shutdown has begun (draining).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Half the watchdog period systemd asked for, or `None` when it asked for none.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Feeds the watchdog every half period while `check` passes, until `shutdown` flips.
/// A failing check withholds `WATCHDOG=1` (so systemd restarts the service when the period
/// runs out) and says why in `STATUS=`.
pub async fn run_watchdog<F, Fut, E>(mut check: F, mut shutdown: watch::Receiver<bool>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Some(every) = watchdog_interval() else {
        return;
    };
    debug!(?every, "systemd watchdog enabled");
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        match check().await {
            Ok(()) => send(&[NotifyState::Watchdog]),
            Err(why) => {
                warn!(%why, "self-check failed; withholding the watchdog ping");
                status(&format!("self-check failed: {why}"));
            }
        }
    }
}

/// GETs `path` from our own HTTP server and expects 200: proves the accept loop and a handler
/// still run, which is what the watchdog should vouch for.
pub async fn probe_http(mut addr: std::net::SocketAddr, path: &str) -> Result<(), ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let probe = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).await?;
        std::io::Result::Ok(head)
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(head)) if head.starts_with(b"HTTP/1.1 200") => Ok(()),
        Ok(Ok(head)) => Err(ProbeError::Status {
            path: path.to_owned(),
            head: String::from_utf8_lossy(&head).into_owned(),
        }),
        Ok(Err(e)) => Err(ProbeError::Unreachable {
            path: path.to_owned(),
            source: e,
        }),
        Err(_) => Err(ProbeError::Timeout {
            path: path.to_owned(),
        }),
    }
}

/// Why the daemon's own HTTP server failed its probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("own {path} answered {head:?}")]
    Status { path: String, head: String },
    #[error("own {path} unreachable: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("own {path} did not answer within 5 s")]
    Timeout { path: String },
}

/// Sets a flag to false when dropped, including when the task holding it panics: lets a
/// self-check see that a task it depends on has ended.
pub struct AliveGuard(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

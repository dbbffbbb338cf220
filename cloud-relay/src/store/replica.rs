//! Replicas: who writes (the lease), how the others follow the store, and the takeover.
//!
//! One task per relay ([`run`]) ticks three clocks:
//! - `store.flush_ms`: the writer writes its dirty rows ([`Persist::flush`]);
//! - `store.lease_ms`: the writer checks its lease is still held (else it steps down); a
//!   follower tries to take it, and on success catches up with the store (the old writer is
//!   fenced by then, so what the store holds is final) before it files anything;
//! - `store.refresh_ms`: a follower applies the rows written since it last looked, so its
//!   `/api/devices` is the writer's, at most one refresh behind.
//!
//! On shutdown the writer writes what is pending (publishing its acks while the link is still
//! up) and gives the lease up, so the next replica takes over at its next lease tick.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::persist::{apply, Persist};
use super::StoreError;
use crate::state::RelayState;

/// Which part a replica plays, as `/api/replica` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Writer,
    Follower,
}

/// The replica task's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub flush: Duration,
    pub lease: Duration,
    pub refresh: Duration,
}

/// At start: everything the store holds into memory. Returns the rows read.
pub async fn restore(state: &RelayState, persist: &Persist) -> Result<usize, StoreError> {
    let rows = persist.store.rows_since(0).await?;
    apply(state, &rows, &persist.stats);
    persist.advance(rows.iter().map(|r| r.rev).max().unwrap_or(0));
    Ok(rows.len())
}

/// Applies what was written since this replica last looked.
async fn catch_up(state: &RelayState, persist: &Persist) -> Result<usize, StoreError> {
    let rows = persist.store.rows_since(persist.cursor()).await?;
    if !rows.is_empty() {
        apply(state, &rows, &persist.stats);
        persist.advance(rows.iter().map(|r| r.rev).max().unwrap_or(0));
    }
    Ok(rows.len())
}

/// Takes the lease if it is free; on success this replica writes from now on.
pub async fn try_take(state: &RelayState, persist: &Persist) -> Result<bool, StoreError> {
    let now = i64::try_from(tierd_runtime::unix_ms()).unwrap_or(i64::MAX);
    let Some(epoch) = persist
        .store
        .try_lease(&persist.id, &persist.api_url, now)
        .await?
    else {
        return Ok(false);
    };
    // Fenced: the previous writer can write nothing more, so this is the final state.
    catch_up(state, persist).await?;
    persist.become_writer(epoch);
    persist.stats.takeovers.fetch_add(1, Ordering::Relaxed);
    if let Ok(l) = persist.store.lease().await {
        persist.set_lease(l);
    }
    info!(epoch, replica = %persist.id, "took the writer's lease: filing telemetry, tuning and pushing");
    Ok(true)
}

/// Logs a failing store at most every 10 s.
#[derive(Default)]
struct Quiet(Option<Instant>);

impl Quiet {
    fn warn(&mut self, what: &str, e: &StoreError) {
        if self.0.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            warn!(error = %e, "{what}");
            self.0 = Some(Instant::now());
        }
    }
}

/// Runs the replica's clocks until `stop` flips; `on_promote` runs each time this replica
/// takes the lease over (not at start: the caller handles that).
pub async fn run(
    state: RelayState,
    persist: Arc<Persist>,
    timing: Timing,
    on_promote: Box<dyn Fn() + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    let mut flush = tokio::time::interval(timing.flush);
    let mut lease = tokio::time::interval(timing.lease);
    let mut refresh = tokio::time::interval(timing.refresh);
    for t in [&mut flush, &mut lease, &mut refresh] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut quiet = Quiet::default();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = flush.tick() => {
                if persist.is_writer() {
                    if let Err(e) = persist.flush(&state).await {
                        quiet.warn("cannot write to the fleet store; acks wait, retrying", &e);
                    }
                }
            }
            _ = lease.tick() => {
                if persist.is_writer() {
                    match persist.store.holds_lease(persist.epoch()).await {
                        Ok(true) => {}
                        Ok(false) | Err(_) => {
                            warn!(replica = %persist.id, "lost the writer's lease; following the store");
                            persist.step_down();
                            // Memory may hold what was never written: read it all again.
                            if let Err(e) = restore(&state, &persist).await {
                                quiet.warn("cannot read the fleet store", &e);
                            }
                        }
                    }
                } else {
                    match try_take(&state, &persist).await {
                        Ok(true) => on_promote(),
                        Ok(false) => {}
                        Err(e) => quiet.warn("cannot reach the fleet store for the lease", &e),
                    }
                }
                if let Ok(l) = persist.store.lease().await {
                    persist.set_lease(l);
                }
            }
            _ = refresh.tick() => {
                if !persist.is_writer() {
                    if let Err(e) = catch_up(&state, &persist).await {
                        quiet.warn("cannot follow the fleet store", &e);
                    }
                }
            }
        }
    }
    if persist.is_writer() {
        if let Err(e) = persist.flush(&state).await {
            warn!(error = %e, "last batch not written; the devices send those records again");
        }
        persist.step_down();
        if let Err(e) = persist.store.release_lease().await {
            warn!(error = %e, "cannot release the writer's lease");
        }
    }
}

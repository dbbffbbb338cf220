//! Batched writes, and acknowledgements that wait for them.
//!
//! Whatever changes a device's state marks its row dirty ([`Persist::mark`]); every
//! `store.flush_ms` (or at once, for an operator's change) the writer serializes the dirty
//! rows from memory and writes them in one fenced transaction. A device's many reports
//! between two flushes cost one row write.
//!
//! Spool acknowledgements are held back ([`Persist::defer_ack`]) until the batch that holds
//! their record's effect is committed, then published: a device deletes only what the store
//! has. Ordering: an ack is deferred after its record was filed and its row marked, and a
//! flush takes the acks and the marks together before it serializes, so every ack it
//! publishes is covered by the rows it wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tierd_protocol::Settings;
use tierd_runtime::link::Publisher;
use tracing::warn;

use super::{FleetStore, Kind, LeaseInfo, Row, StoreError};
use crate::state::RelayState;

/// The fleet-wide rows (kind `kv`).
pub const OVERRIDES: &str = "overrides";
pub const EPOCHS: &str = "epochs";
pub const ROLLOUTS: &str = "rollouts";

/// Rows and acks waiting for the next batch.
#[derive(Debug, Default)]
struct Pending {
    rows: BTreeSet<(Kind, String)>,
    /// Highest sequence to acknowledge per (device, stream).
    acks: BTreeMap<(String, u64), u64>,
}

/// Counters of the store's side (exported on `/metrics`).
#[derive(Debug, Default)]
pub struct PersistStats {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub failures: AtomicU64,
    /// Rows read back from the store (at start, and by a replica following it).
    pub rows_read: AtomicU64,
    pub rows_unreadable: AtomicU64,
    pub last_batch_us: AtomicU64,
    pub takeovers: AtomicU64,
}

/// The relay's side of the fleet store: what is dirty, whether this replica writes, and where
/// it is in the store's history.
pub struct Persist {
    pub store: Arc<dyn FleetStore>,
    pending: Mutex<Pending>,
    /// One flush at a time: batches are written in the order they were taken.
    flushing: tokio::sync::Mutex<()>,
    writer: AtomicBool,
    epoch: AtomicI64,
    /// The newest batch this replica has written or applied.
    cursor: AtomicI64,
    client: Publisher,
    /// This replica's name and API URL, as the lease shows them.
    pub id: String,
    pub api_url: String,
    /// The lease as last read (for followers' redirects and `/api/replica`).
    lease: Mutex<Option<LeaseInfo>>,
    pub stats: PersistStats,
}

impl std::fmt::Debug for Persist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persist")
            .field("store", &self.store)
            .field("id", &self.id)
            .field("writer", &self.is_writer())
            .field("cursor", &self.cursor())
            .finish_non_exhaustive()
    }
}

impl Persist {
    pub fn new(store: Arc<dyn FleetStore>, client: Publisher, id: String, api_url: String) -> Self {
        Persist {
            store,
            pending: Mutex::new(Pending::default()),
            flushing: tokio::sync::Mutex::new(()),
            writer: AtomicBool::new(false),
            epoch: AtomicI64::new(0),
            cursor: AtomicI64::new(0),
            client,
            id,
            api_url,
            lease: Mutex::new(None),
            stats: PersistStats::default(),
        }
    }

    /// Whether this replica holds the lease (files telemetry, tunes, pushes, writes).
    pub fn is_writer(&self) -> bool {
        self.writer.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn cursor(&self) -> i64 {
        self.cursor.load(Ordering::Acquire)
    }

    pub(super) fn advance(&self, rev: i64) {
        self.cursor.fetch_max(rev, Ordering::AcqRel);
    }

    pub(super) fn become_writer(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::Release);
        self.writer.store(true, Ordering::Release);
    }

    /// Stops writing: what was pending is dropped (its acks were never sent, so the devices
    /// send those records again to whoever writes next).
    pub(super) fn step_down(&self) {
        self.writer.store(false, Ordering::Release);
        if let Ok(mut p) = self.pending.lock() {
            *p = Pending::default();
        }
    }

    pub fn lease(&self) -> Option<LeaseInfo> {
        self.lease.lock().ok().and_then(|l| l.clone())
    }

    pub(super) fn set_lease(&self, info: LeaseInfo) {
        if let Ok(mut l) = self.lease.lock() {
            *l = Some(info);
        }
    }

    /// Row `kind/key` changed in memory: written with the next batch.
    pub fn mark(&self, kind: Kind, key: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.rows.insert((kind, key.to_string()));
        }
    }

    /// Acknowledges `device`'s `stream` up to `upto` once the next batch is committed.
    pub fn defer_ack(&self, device: &str, stream: u64, upto: u64) {
        if let Ok(mut p) = self.pending.lock() {
            let e = p.acks.entry((device.to_string(), stream)).or_insert(upto);
            *e = (*e).max(upto);
        }
    }

    /// Rows waiting for the next batch.
    pub fn dirty(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.rows.len())
    }

    /// Writes what is dirty in one batch and then publishes the acks it covers. Returns the
    /// rows written. A failed batch is kept for the next flush; a fenced one (the lease was
    /// taken over) makes this replica step down.
    pub async fn flush(&self, state: &RelayState) -> Result<usize, StoreError> {
        let _one = self.flushing.lock().await;
        if !self.is_writer() {
            return Ok(0);
        }
        let pending = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return Ok(0),
        };
        if pending.rows.is_empty() && pending.acks.is_empty() {
            return Ok(0);
        }
        let rows = collect(state, &pending.rows, &self.stats);
        let n = rows.len();
        let t0 = std::time::Instant::now();
        let result = if rows.is_empty() {
            Ok(self.cursor())
        } else {
            self.store.write(self.epoch(), rows).await
        };
        match result {
            Ok(rev) => {
                self.advance(rev);
                if n > 0 {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats.rows.fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.last_batch_us.store(
                        u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
                // One cumulative ack per stream for the whole batch, waiting for room in the
                // link's queue (a burst of thousands would overflow it and stall the spools).
                // (Bounded: past 2 s for the batch, what does not fit is dropped and resent.)
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
                for ((device, stream), upto) in pending.acks {
                    crate::state::publish_ack_waiting(
                        &self.client,
                        &device,
                        stream,
                        upto,
                        deadline,
                    )
                    .await;
                }
                Ok(n)
            }
            Err(e @ StoreError::Fenced { .. }) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.step_down();
                Err(e)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                // Kept for the next batch; the acks wait with it.
                if let Ok(mut p) = self.pending.lock() {
                    p.rows.extend(pending.rows);
                    for (k, upto) in pending.acks {
                        let e = p.acks.entry(k).or_insert(upto);
                        *e = (*e).max(upto);
                    }
                }
                Err(e)
            }
        }
    }
}

/// Serializes the dirty rows from memory (each lock taken once).
fn collect(state: &RelayState, dirty: &BTreeSet<(Kind, String)>, stats: &PersistStats) -> Vec<Row> {
    let mut rows = Vec::with_capacity(dirty.len());
    let mut push = |kind: Kind, key: &str, body: Option<Result<String, serde_json::Error>>| {
        match body {
            Some(Ok(body)) => rows.push(Row {
                kind,
                key: key.to_string(),
                body,
                rev: 0,
            }),
            Some(Err(e)) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(kind = kind.as_str(), key, error = %e, "cannot serialize a fleet store row; not written");
            }
            None => {}
        }
    };
    if let Ok(mut fleet) = state.fleet() {
        for (kind, key) in dirty {
            match kind {
                Kind::Device => push(*kind, key, fleet.stored_device(key)),
                Kind::Evidence => push(*kind, key, fleet.stored_evidence(key)),
                _ => {}
            }
        }
    }
    if let Ok(control) = state.control() {
        for (kind, key) in dirty {
            match (kind, key.as_str()) {
                (Kind::Control, _) => push(*kind, key, control.stored(key)),
                (Kind::Kv, OVERRIDES) => push(
                    *kind,
                    key,
                    Some(serde_json::to_string(control.operator_overrides())),
                ),
                (Kind::Kv, EPOCHS) => {
                    push(*kind, key, Some(serde_json::to_string(control.epochs())))
                }
                _ => {}
            }
        }
    }
    if dirty.contains(&(Kind::Kv, ROLLOUTS.to_string())) {
        if let Ok(r) = state.rollouts() {
            push(Kind::Kv, ROLLOUTS, Some(serde_json::to_string(&*r)));
        }
    }
    rows
}

/// Applies rows read from the store to memory (at start, or following the writer). An
/// unreadable row is logged, counted and skipped: the rest of the fleet is served.
pub fn apply(state: &RelayState, rows: &[Row], stats: &PersistStats) {
    let bad = |row: &Row, why: &dyn std::fmt::Display| {
        stats.rows_unreadable.fetch_add(1, Ordering::Relaxed);
        warn!(kind = row.kind.as_str(), key = %row.key, error = %why, "unreadable fleet store row; skipped");
    };
    stats
        .rows_read
        .fetch_add(rows.len() as u64, Ordering::Relaxed);
    if let Ok(mut fleet) = state.fleet() {
        for row in rows {
            let result = match row.kind {
                Kind::Device => fleet.restore_device(&row.key, &row.body).map(|_| true),
                Kind::Evidence => fleet.restore_evidence(&row.key, &row.body),
                _ => continue,
            };
            match result {
                Ok(true) => {}
                Ok(false) => bad(row, &"evidence of a device with no stored record"),
                Err(e) => bad(row, &e),
            }
        }
    }
    if let Ok(mut control) = state.control() {
        for row in rows {
            match (row.kind, row.key.as_str()) {
                (Kind::Control, _) => {
                    if let Err(e) = control.restore(&row.key, &row.body) {
                        bad(row, &e);
                    }
                }
                (Kind::Kv, OVERRIDES) => match parse_overrides(&row.body) {
                    Ok(map) => control.set_operator_overrides(map),
                    Err(e) => bad(row, &e),
                },
                (Kind::Kv, EPOCHS) => match serde_json::from_str(&row.body) {
                    Ok(map) => control.set_epochs(map),
                    Err(e) => bad(row, &e),
                },
                _ => {}
            }
        }
    }
    for row in rows {
        if row.kind == Kind::Kv && row.key == ROLLOUTS {
            match serde_json::from_str(&row.body) {
                Ok(restored) => {
                    if let Ok(mut r) = state.rollouts() {
                        r.reload(restored);
                    }
                }
                Err(e) => bad(row, &e),
            }
        }
    }
}

/// Operator overrides as stored: each device's settings valid, or the row is refused.
fn parse_overrides(body: &str) -> Result<BTreeMap<String, Settings>, String> {
    let map: BTreeMap<String, Settings> = serde_json::from_str(body).map_err(|e| e.to_string())?;
    for (device, s) in &map {
        s.validate()
            .map_err(|reason| format!("overrides of {device}: {reason}"))?;
    }
    Ok(map)
}

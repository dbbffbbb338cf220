//! Store and forward: telemetry, calibration reports and config acks are written to the
//! on-disk [`Spool`] first and leave it only when the relay acknowledges them end to end.
//!
//! The broker's PUBACK is not enough: rumqttc gives no delivery handle for a publish, drops
//! QoS 1 publishes in flight at a reconnect under a clean session, and a PUBACK only means the
//! broker took the message, not that a relay filed it. So every record travels in a
//! [`Spooled`] envelope carrying its spool sequence number, the relay de-duplicates by
//! `(device, stream, seq)` and answers with a cumulative [`SpoolAck`], and this task runs
//! go-back-N over it: after a reconnect, or when acks stop making progress for
//! `resend_after`, it sends again from the oldest unacknowledged record. At most `window`
//! records are unacknowledged on the wire at once, so draining a long outage never floods the
//! MQTT client's bounded request queue.
//!
//! [`Sender`] is the pure part (which sequence numbers to send now); [`run`] does the I/O.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use tierd_protocol::{decode, encode, RecordKind, SpoolAck, Spooled, Topic, TopicKind};
use tierd_runtime::link::Publisher;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::spool::{Spool, SpoolStats};
use crate::telemetry::{ReportSink, SinkError};

pub type SharedSpool = Arc<Mutex<Spool>>;

/// Records unacknowledged on the wire at most.
pub const WINDOW: u64 = 32;

/// Go-back-N bookkeeping. Pure: the caller passes the spool's `floor` (oldest unacked) and
/// `next_seq`, and the time.
#[derive(Debug, Clone)]
pub struct Sender {
    next: u64,
    window: u64,
    resend_after: Duration,
    /// When the oldest outstanding record was (re)sent or last acknowledged.
    clock: Option<Instant>,
}

impl Sender {
    pub fn new(window: u64, resend_after: Duration) -> Self {
        Sender {
            next: 0,
            window: window.max(1),
            resend_after,
            clock: None,
        }
    }

    /// A new connection: nothing in flight survives it for sure, start from the oldest.
    pub fn reconnected(&mut self, floor: u64) {
        self.next = floor;
        self.clock = None;
    }

    /// An acknowledgement released records; `floor` is the spool's new floor.
    pub fn acked(&mut self, floor: u64, now: Instant) {
        self.next = self.next.max(floor);
        self.clock = Some(now);
    }

    /// The sequence numbers to send now (possibly empty).
    pub fn due(&mut self, floor: u64, next_seq: u64, now: Instant) -> Range<u64> {
        self.next = self.next.max(floor);
        let outstanding = self.next > floor;
        if outstanding {
            if let Some(t) = self.clock {
                if now.duration_since(t) >= self.resend_after {
                    debug!(
                        floor,
                        next = self.next,
                        "no acknowledgement in time; sending again"
                    );
                    self.next = floor;
                    self.clock = None;
                }
            }
        }
        let end = next_seq.min(floor.saturating_add(self.window));
        let range = self.next..end.max(self.next);
        if !range.is_empty() && self.clock.is_none() {
            self.clock = Some(now);
        }
        self.next = range.end;
        range
    }

    /// A publish could not be queued: `seq` and after go again next time.
    pub fn rewind(&mut self, seq: u64) {
        self.next = self.next.min(seq);
    }
}

/// Where the telemetry loop and the config handler put records: the spool, then a nudge.
#[derive(Clone, Debug)]
pub struct SpoolSink {
    pub spool: SharedSpool,
    pub notify: Arc<Notify>,
}

impl ReportSink for SpoolSink {
    fn send(&self, kind: RecordKind, payload: Vec<u8>) -> Result<(), SinkError> {
        let mut spool = self.spool.lock().map_err(|_| SinkError::Poisoned)?;
        spool
            .append(kind.as_u8(), &payload)
            .map_err(|e| SinkError::Spool(Box::new(e)))?;
        drop(spool);
        self.notify.notify_one();
        Ok(())
    }

    fn spool(&self) -> tierd_protocol::SpoolCounts {
        self.stats()
            .map(|s| tierd_protocol::SpoolCounts {
                pending: s.pending_records,
                dropped: s.dropped,
                corrupt: s.corrupt,
            })
            .unwrap_or_default()
    }
}

impl SpoolSink {
    pub fn stats(&self) -> Option<SpoolStats> {
        self.spool.lock().ok().map(|s| s.stats())
    }
}

pub struct Forwarder {
    pub sink: SpoolSink,
    pub publisher: Publisher,
    pub device_id: String,
    /// The relay's cumulative acknowledgements, as the link routes them.
    pub acks: mpsc::Receiver<Publish>,
    pub resend_after: Duration,
    pub flush_timeout: Duration,
}

struct Topics {
    telemetry: String,
    config_ack: String,
}

/// Publishes what is due; stops at the first publish the client cannot queue.
fn pump(spool: &SharedSpool, sender: &mut Sender, publisher: &Publisher, topics: &Topics) {
    let Ok(spool) = spool.lock() else { return };
    let range = sender.due(spool.floor(), spool.next_seq(), Instant::now());
    if range.is_empty() {
        return;
    }
    let records = match spool.records_from(range.start, (range.end - range.start) as usize) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the spool");
            sender.rewind(range.start);
            return;
        }
    };
    let (stream_id, floor) = (spool.stream_id(), spool.floor());
    drop(spool);
    for r in records {
        // A record that cannot go out as it is (a kind this build does not know, or too big for
        // the envelope) still goes out, empty, under its seq: the relay rejects and logs it, and
        // the stream stays contiguous. Skipping it would leave every later record waiting
        // behind a gap the relay can never close.
        let (kind, body) = match RecordKind::from_u8(r.kind) {
            Some(k) => (k, r.payload),
            None => {
                warn!(
                    seq = r.seq,
                    kind = r.kind,
                    "spool record of unknown kind; sent empty"
                );
                (RecordKind::Telemetry, Vec::new())
            }
        };
        let mut envelope = Spooled {
            stream_id,
            seq: r.seq,
            floor,
            kind,
            body,
        };
        let payload = match encode(&envelope) {
            Ok(p) => p,
            Err(e) => {
                warn!(seq = r.seq, error = %e, "spool record cannot be sent as it is; sent empty");
                envelope.body.clear();
                match encode(&envelope) {
                    Ok(p) => p,
                    Err(_) => continue,
                }
            }
        };
        let topic = match kind {
            RecordKind::ConfigAck => &topics.config_ack,
            RecordKind::Telemetry
            | RecordKind::Calibration
            | RecordKind::RolloutAck
            | RecordKind::Shadow => &topics.telemetry,
        };
        if let Err(e) = publisher.try_publish(topic, QoS::AtLeastOnce, false, payload) {
            debug!(seq = r.seq, error = %e, "MQTT queue full; will send again");
            sender.rewind(r.seq);
            return;
        }
    }
}

/// Forwards spooled records until `shutdown` resolves, then tries for `flush_timeout` to have
/// everything pending acknowledged; what is left stays on disk for the next start.
pub async fn run(mut f: Forwarder, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let topics = match (
        Topic::new(&f.device_id, TopicKind::Telemetry),
        Topic::new(&f.device_id, TopicKind::ConfigAck),
    ) {
        (Ok(t), Ok(c)) => Topics {
            telemetry: t.to_string(),
            config_ack: c.to_string(),
        },
        _ => return,
    };
    let mut sender = Sender::new(WINDOW, f.resend_after);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut connection = f.publisher.connection();
    loop {
        let connected = *connection.borrow();
        if connected {
            pump(&f.sink.spool, &mut sender, &f.publisher, &topics);
        }
        if let Some(deadline) = stopping {
            let pending = f.sink.stats().map_or(0, |s| s.pending_records);
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                if pending > 0 {
                    info!(pending, "stopping with records not yet acknowledged; they stay in the spool for the next start");
                }
                return;
            }
        }
        tokio::select! {
            _ = f.sink.notify.notified() => {}
            _ = tick.tick() => {}
            Some(ack) = f.acks.recv() => match decode::<SpoolAck>(&ack.payload) {
                Ok(ack) => handle_ack(&f.sink.spool, &mut sender, ack),
                Err(e) => warn!(error = %e, "rejected spool ack"),
            },
            changed = connection.changed() => {
                if changed.is_err() {
                    return;
                }
                if *connection.borrow_and_update() {
                    if let Ok(s) = f.sink.spool.lock() {
                        sender.reconnected(s.floor());
                    }
                }
            }
            _ = &mut shutdown, if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + f.flush_timeout);
            }
        }
    }
}

fn handle_ack(spool: &SharedSpool, sender: &mut Sender, ack: SpoolAck) {
    let Ok(mut s) = spool.lock() else { return };
    if ack.stream_id != s.stream_id() {
        debug!(
            stream = ack.stream_id,
            "ack for another spool stream ignored"
        );
        return;
    }
    match s.ack(ack.upto) {
        Ok(0) => {}
        Ok(released) => {
            debug!(upto = ack.upto, released, "spool records acknowledged");
            sender.acked(s.floor(), Instant::now());
        }
        Err(e) => warn!(error = %e, "cannot record a spool acknowledgement"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_a_window_then_waits_for_acks() {
        let t0 = Instant::now();
        let mut s = Sender::new(4, Duration::from_secs(10));
        assert_eq!(s.due(1, 11, t0), 1..5);
        assert_eq!(s.due(1, 11, t0), 5..5, "window full");
        s.acked(3, t0);
        assert_eq!(s.due(3, 11, t0), 5..7);
    }

    #[test]
    fn goes_back_after_silence_or_reconnect() {
        let t0 = Instant::now();
        let mut s = Sender::new(8, Duration::from_secs(10));
        assert_eq!(s.due(1, 4, t0), 1..4);
        assert_eq!(s.due(1, 4, t0 + Duration::from_secs(5)), 4..4);
        assert_eq!(s.due(1, 4, t0 + Duration::from_secs(11)), 1..4, "resent");
        s.reconnected(2);
        assert_eq!(s.due(2, 5, t0 + Duration::from_secs(12)), 2..5);
    }

    #[test]
    fn rewind_and_floors_above_next() {
        let t0 = Instant::now();
        let mut s = Sender::new(8, Duration::from_secs(10));
        assert_eq!(s.due(1, 6, t0), 1..6);
        s.rewind(3);
        assert_eq!(s.due(1, 6, t0), 3..6);
        // Records dropped at the cap move the floor past what was sent.
        assert_eq!(s.due(9, 12, t0), 9..12);
        assert_eq!(s.due(9, 12, t0), 12..12);
    }
}

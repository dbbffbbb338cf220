//! A virtual device's spool, in memory: records wait here until the relay acknowledges them,
//! and leave by the agent's go-back-N (`agent/src/forward.rs`): at most [`WINDOW`] records
//! unacknowledged on the wire, everything from the oldest unacknowledged one again after a
//! reconnect or when acks stop making progress for `resend_after`. Pure: the caller passes the
//! time and does the publishing.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use tierd_protocol::RecordKind;

/// Records unacknowledged on the wire at most (the agent's `forward::WINDOW`).
pub const WINDOW: u64 = 32;

/// One spooled record: its kind and its body, encoded with its own header.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub kind: RecordKind,
    pub body: Vec<u8>,
}

#[derive(Debug)]
pub struct Outbox {
    pub stream_id: u64,
    /// Oldest record held (everything below was acknowledged or dropped at the cap).
    floor: u64,
    /// Sequence number of the next record appended.
    next_seq: u64,
    /// Next record to send.
    send_next: u64,
    records: VecDeque<Record>,
    cap: usize,
    resend_after: Duration,
    /// When the oldest outstanding record was (re)sent or last acknowledged.
    clock: Option<Instant>,
    /// Records dropped, oldest first, at the cap.
    pub dropped: u64,
    /// Times everything outstanding went again (ack timeout or reconnect).
    pub resends: u64,
}

impl Outbox {
    /// An empty spool stream starting at seq 1; `cap` records held at most.
    pub fn new(stream_id: u64, cap: usize, resend_after: Duration) -> Self {
        Outbox {
            stream_id,
            floor: 1,
            next_seq: 1,
            send_next: 1,
            records: VecDeque::new(),
            cap: cap.max(1),
            resend_after,
            clock: None,
            dropped: 0,
            resends: 0,
        }
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Records held, not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.next_seq - self.floor
    }

    /// Spools a record; at the cap the oldest is dropped (the floor moves past it, so the
    /// relay counts it as skipped, not missing). Returns its seq.
    pub fn append(&mut self, kind: RecordKind, body: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.records.push_back(Record { seq, kind, body });
        self.next_seq += 1;
        while self.records.len() > self.cap {
            self.records.pop_front();
            self.floor += 1;
            self.dropped += 1;
        }
        self.send_next = self.send_next.max(self.floor);
        seq
    }

    /// The relay acknowledged everything up to `upto`: those records are released. Returns
    /// how many.
    pub fn ack(&mut self, upto: u64, now: Instant) -> u64 {
        let upto = upto.min(self.next_seq.saturating_sub(1));
        if upto < self.floor {
            return 0;
        }
        let released = upto + 1 - self.floor;
        while self.records.front().is_some_and(|r| r.seq <= upto) {
            self.records.pop_front();
        }
        self.floor = upto + 1;
        self.send_next = self.send_next.max(self.floor);
        self.clock = Some(now);
        released
    }

    /// A new connection: nothing in flight survives it for sure; start from the oldest.
    pub fn reconnected(&mut self) {
        if self.send_next > self.floor {
            self.resends += 1;
        }
        self.send_next = self.floor;
        self.clock = None;
    }

    /// The records to send now (possibly none), in order.
    pub fn due(&mut self, now: Instant) -> Range<u64> {
        if self.send_next > self.floor {
            if let Some(t) = self.clock {
                if now.duration_since(t) >= self.resend_after {
                    self.send_next = self.floor;
                    self.clock = None;
                    self.resends += 1;
                }
            }
        }
        let end = self.next_seq.min(self.floor.saturating_add(WINDOW));
        let range = self.send_next..end.max(self.send_next);
        if !range.is_empty() && self.clock.is_none() {
            self.clock = Some(now);
        }
        self.send_next = range.end;
        range
    }

    /// A publish could not be queued: `seq` and after go again next time.
    pub fn rewind(&mut self, seq: u64) {
        self.send_next = self.send_next.min(seq).max(self.floor);
    }

    /// Record `seq`, if still held.
    pub fn get(&self, seq: u64) -> Option<&Record> {
        let i = seq.checked_sub(self.floor)?;
        self.records.get(usize::try_from(i).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u64) -> Outbox {
        let mut o = Outbox::new(7, 1000, Duration::from_secs(10));
        for _ in 0..n {
            o.append(RecordKind::Telemetry, vec![1]);
        }
        o
    }

    #[test]
    fn sends_a_window_then_waits_for_acks() {
        let t0 = Instant::now();
        let mut o = filled(40);
        assert_eq!(o.due(t0), 1..33);
        assert_eq!(o.due(t0), 33..33, "window full");
        assert_eq!(o.ack(10, t0), 10);
        assert_eq!((o.floor(), o.pending()), (11, 30));
        assert_eq!(o.due(t0), 33..41);
        assert_eq!(o.get(11).map(|r| r.seq), Some(11));
        assert!(o.get(10).is_none());
        assert_eq!(o.ack(40, t0), 30);
        assert_eq!(o.pending(), 0);
        assert_eq!(o.ack(40, t0), 0, "cumulative acks repeat harmlessly");
        assert_eq!(
            o.ack(1000, t0),
            0,
            "an ack past what was sent releases nothing more"
        );
    }

    #[test]
    fn goes_back_after_silence_or_a_reconnect() {
        let t0 = Instant::now();
        let mut o = filled(5);
        assert_eq!(o.due(t0), 1..6);
        assert_eq!(o.due(t0 + Duration::from_secs(5)), 6..6);
        assert_eq!(o.due(t0 + Duration::from_secs(11)), 1..6, "no ack in time");
        assert_eq!(o.resends, 1);
        o.ack(2, t0 + Duration::from_secs(12));
        o.reconnected();
        assert_eq!(o.due(t0 + Duration::from_secs(12)), 3..6);
        o.rewind(4);
        assert_eq!(o.due(t0 + Duration::from_secs(12)), 4..6);
    }

    /// The agent's `Sender` keeps the last ack's time as its clock, so a record sent after a
    /// quiet spell longer than `resend_after` goes again at the next pump unless its ack came
    /// first. Mirrored here (it is what the relay sees from real agents); on loopback the ack
    /// nearly always wins.
    #[test]
    fn after_a_quiet_spell_the_next_record_goes_twice_unless_acked_first() {
        let t0 = Instant::now();
        let mut o = filled(1);
        assert_eq!(o.due(t0), 1..2);
        o.ack(1, t0);
        o.append(RecordKind::Telemetry, vec![2]);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(o.due(later), 2..3);
        assert_eq!(o.due(later + Duration::from_millis(20)), 2..3, "sent again");
    }

    #[test]
    fn the_cap_drops_the_oldest_and_moves_the_floor() {
        let mut o = Outbox::new(1, 3, Duration::from_secs(1));
        for _ in 0..5 {
            o.append(RecordKind::Calibration, Vec::new());
        }
        assert_eq!((o.floor(), o.pending(), o.dropped), (3, 3, 2));
        assert_eq!(o.due(Instant::now()), 3..6);
    }
}

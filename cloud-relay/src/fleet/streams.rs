//! Spool streams: exactly-once, in-order delivery of spooled records (telemetry, calibration,
//! config acks), and the accounting of what will never come (gaps the agent's floor skips).

use serde::{Deserialize, Serialize};

/// What the relay made of one spooled record (see [`Fleet::accept`](super::Fleet::accept)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The next record of the stream: process it.
    Deliver,
    /// Already delivered (a resend): acknowledge again, do not process.
    Duplicate,
    /// An earlier record has not arrived yet (lost in transit): not processed; the agent
    /// sends again from the acknowledged point (go-back-N).
    Ahead,
}

/// Spool streams remembered per device (see [`Fleet::accept`](super::Fleet::accept)).
pub const STREAMS_PER_DEVICE: usize = 4;

/// Delivery bookkeeping of a device's spool stream, as `/api/devices` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub stream_id: u64,
    /// The next sequence number expected.
    pub next: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Records the agent will never send (its floor moved past them): dropped at its spool's
    /// cap, or delivered to another relay replica.
    pub skipped: u64,
}

/// A device's spool streams, most recently active first, at most [`STREAMS_PER_DEVICE`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Streams(Vec<StreamRecord>);

impl Streams {
    /// Decides what to do with record `seq` of `stream_id` (whose sender will never again send
    /// anything below `floor`), and returns the cumulative acknowledgement to send (`None`
    /// before anything was delivered).
    pub(super) fn accept(
        &mut self,
        stream_id: u64,
        seq: u64,
        floor: u64,
    ) -> (Delivery, Option<u64>) {
        let list = &mut self.0;
        let s = match list.iter().position(|s| s.stream_id == stream_id) {
            Some(i) => {
                let s = list.remove(i);
                list.insert(0, s);
                &mut list[0]
            }
            None => {
                // First contact: nothing below its floor will come.
                list.insert(
                    0,
                    StreamRecord {
                        stream_id,
                        next: floor,
                        ..Default::default()
                    },
                );
                list.truncate(STREAMS_PER_DEVICE);
                &mut list[0]
            }
        };
        if floor > s.next {
            s.skipped += floor - s.next;
            s.next = floor;
        }
        let delivery = if seq < s.next {
            s.duplicates += 1;
            Delivery::Duplicate
        } else if seq == s.next {
            // Moves on in `commit`, once the record was filed.
            Delivery::Deliver
        } else {
            s.out_of_order += 1;
            Delivery::Ahead
        };
        // Everything below `next` was delivered or will never be sent: safe to release.
        (delivery, s.next.checked_sub(1))
    }

    /// Record `seq` of `stream_id` was filed: the stream moves past it. Returns the cumulative
    /// acknowledgement, `None` if `seq` is not the next record of a known stream.
    pub(super) fn commit(&mut self, stream_id: u64, seq: u64) -> Option<u64> {
        let s = self.0.iter_mut().find(|s| s.stream_id == stream_id)?;
        if seq != s.next {
            return None;
        }
        s.next += 1;
        s.delivered += 1;
        Some(seq)
    }

    /// The most recently active stream.
    pub(super) fn latest(&self) -> Option<&StreamRecord> {
        self.0.first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Fleet, FleetError};

    /// `accept`, then `commit` what was delivered (every record here is filed).
    fn take(
        f: &mut Fleet,
        device: &str,
        stream: u64,
        seq: u64,
        floor: u64,
    ) -> Result<(Delivery, Option<u64>), FleetError> {
        let (d, ack) = f.accept(device, stream, seq, floor)?;
        if d == Delivery::Deliver {
            return Ok((d, f.commit(device, stream, seq)));
        }
        Ok((d, ack))
    }

    #[test]
    fn a_rejected_record_is_not_acknowledged_and_comes_again() {
        let mut f = Fleet::new(2);
        assert_eq!(take(&mut f, "a", 7, 1, 1), Ok((Delivery::Deliver, Some(1))));
        // Record 2 is delivered but rejected: not committed, so not acknowledged.
        assert_eq!(f.accept("a", 7, 2, 1), Ok((Delivery::Deliver, Some(1))));
        assert_eq!(f.accept("a", 7, 3, 1), Ok((Delivery::Ahead, Some(1))));
        // The resend of 2 is delivered again, and this time filed.
        assert_eq!(take(&mut f, "a", 7, 2, 1), Ok((Delivery::Deliver, Some(2))));
        assert_eq!(f.commit("a", 7, 2), None, "a second commit does nothing");
        assert_eq!(f.stream("a").map(|s| s.delivered), Some(2));
    }

    #[test]
    fn spooled_records_are_delivered_once_and_in_order() {
        let mut f = Fleet::new(2);
        assert_eq!(take(&mut f, "a", 7, 5, 5), Ok((Delivery::Deliver, Some(5))));
        assert_eq!(take(&mut f, "a", 7, 7, 5), Ok((Delivery::Ahead, Some(5))));
        assert_eq!(take(&mut f, "a", 7, 6, 5), Ok((Delivery::Deliver, Some(6))));
        assert_eq!(
            take(&mut f, "a", 7, 5, 5),
            Ok((Delivery::Duplicate, Some(6)))
        );
        assert_eq!(take(&mut f, "a", 7, 7, 5), Ok((Delivery::Deliver, Some(7))));
        // The agent dropped 8..=9 at its cap: its floor says so.
        assert_eq!(
            take(&mut f, "a", 7, 10, 10),
            Ok((Delivery::Deliver, Some(10)))
        );
        let s = f.stream("a").copied().expect("stream");
        assert_eq!(
            (s.delivered, s.duplicates, s.out_of_order, s.skipped),
            (4, 1, 1, 2)
        );
        // A recreated spool starts a new stream; a stranger's made-up streams do not reset
        // the real one.
        assert_eq!(take(&mut f, "a", 8, 1, 1), Ok((Delivery::Deliver, Some(1))));
        assert_eq!(take(&mut f, "a", 99, 1_000, 0), Ok((Delivery::Ahead, None)));
        assert_eq!(take(&mut f, "a", 8, 2, 1), Ok((Delivery::Deliver, Some(2))));
        // A relay that starts late takes the floor as the start.
        assert_eq!(
            take(&mut f, "b", 3, 40, 38),
            Ok((Delivery::Ahead, Some(37)))
        );
        assert!(matches!(
            take(&mut f, "c", 1, 1, 1),
            Err(FleetError::Full(2, _))
        ));
    }
}

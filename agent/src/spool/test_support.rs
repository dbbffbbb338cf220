//! Helpers shared by the spool's unit tests.

use std::path::{Path, PathBuf};

use super::*;

pub(super) const CAP: u64 = 1 << 20;

pub(super) fn open(dir: &Path) -> (Spool, Recovery) {
    Spool::open(dir, CAP).unwrap()
}

pub(super) fn all(s: &Spool) -> Vec<Record> {
    s.records_from(0, usize::MAX).unwrap()
}

pub(super) fn payload(i: u64) -> Vec<u8> {
    format!("record {i} {}", "x".repeat((i % 7) as usize)).into_bytes()
}

pub(super) fn file(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

pub(super) fn spool_with(dir: &Path, n: u64) -> u64 {
    let (mut s, _) = open(dir);
    for i in 1..=n {
        s.append(1, &payload(i)).unwrap();
    }
    s.stream_id()
}

pub(super) fn check_recovered(dir: &Path, stream: u64, good: u64, corrupt: u64) -> Spool {
    let (s, r) = open(dir);
    assert_eq!((r.stream_id, r.created, r.records), (stream, false, good));
    assert_eq!((r.corrupt_frames, s.stats().corrupt), (corrupt, corrupt));
    assert!(r.corrupt_bytes > 0);
    let recs = all(&s);
    assert_eq!(recs.len() as u64, good);
    for (i, r) in (1..).zip(&recs) {
        assert_eq!((r.seq, &r.payload), (i, &payload(i)));
    }
    assert_eq!(s.next_seq(), good + 1);
    s
}

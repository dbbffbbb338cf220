//! Property tests of the spool's file format and recovery (`edge_agent::spool`).
//!
//! - [`spool::scan`] is the parser of a file that power loss, flash wear or an operator may have
//!   damaged: on arbitrary bytes it must never panic and must describe the input consistently,
//!   and on a damaged valid image it must return a prefix of the original frames, never a frame
//!   that was not written. 100,000 cases each by default (`PROPTEST_CASES` overrides).
//! - The whole spool on real files: random appends, acks, reopens and truncations of the file
//!   between reopens; after each reopen the records recovered are exactly what was appended
//!   under those seqs. 256 cases by default (`SPOOL_FILE_CASES` overrides): each case does
//!   dozens of fsyncs.

use std::collections::BTreeMap;
use std::path::Path;

use edge_agent::spool::{self, Header, Spool, FILE_NAME, FRAME_OVERHEAD, HEADER_LEN};
use proptest::prelude::*;

// Shared with the other crates' fuzz suites (std only, so included rather than depended on).
#[path = "../../devkit/src/fuzz.rs"]
mod fuzz;
use fuzz::cases;

fn file_cases() -> u32 {
    std::env::var("SPOOL_FILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The invariants every scan result satisfies, whatever the input.
fn check_consistent(bytes: &[u8], s: &spool::Scan) -> Result<(), TestCaseError> {
    let len = bytes.len() as u64;
    prop_assert_eq!(s.valid_len + s.corrupt_bytes, len);
    prop_assert_eq!(s.corrupt_frames == 0, s.corrupt_bytes == 0);
    match s.header {
        None => {
            prop_assert!(s.frames.is_empty());
            prop_assert_eq!(s.valid_len, 0);
            prop_assert_eq!(s.corrupt_frames, u64::from(!bytes.is_empty()));
        }
        Some(h) => {
            prop_assert_eq!(Header::decode(bytes), Some(h));
            prop_assert!(s.valid_len >= HEADER_LEN);
            let mut pos = HEADER_LEN;
            for (i, f) in s.frames.iter().enumerate() {
                prop_assert_eq!(f.seq, h.base_seq + i as u64);
                prop_assert_eq!(f.offset, pos);
                prop_assert!(f.len >= FRAME_OVERHEAD);
                prop_assert!(f.end() <= len);
                pos = f.end();
            }
            prop_assert_eq!(pos, s.valid_len);
            // The corrupt tail cannot hold more frames than minimal frames fit in it.
            prop_assert!(s.corrupt_frames <= s.corrupt_bytes / FRAME_OVERHEAD + 1);
        }
    }
    Ok(())
}

/// A valid image: header and frames of the given kinds and payloads from `base_seq`.
fn image(h: Header, frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut img = h.encode().to_vec();
    for (i, (kind, payload)) in frames.iter().enumerate() {
        img.extend(spool::encode_frame(h.base_seq + i as u64, *kind, payload));
    }
    img
}

fn header_strategy() -> impl Strategy<Value = Header> {
    (
        any::<u64>(),
        1u64..=spool::MAX_BASE_SEQ,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(stream_id, base_seq, dropped, corrupt)| Header {
            stream_id,
            base_seq,
            dropped,
            corrupt,
        })
}

#[derive(Debug, Clone)]
enum Damage {
    /// Keep this fraction (per mille) of the image.
    Truncate(u16),
    /// XOR a non-zero mask into the byte at this fraction (per mille) of the image.
    Flip(u16, u8),
    Append(Vec<u8>),
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0u16..=1000).prop_map(Damage::Truncate),
        (0u16..1000, 1u8..=255).prop_map(|(at, m)| Damage::Flip(at, m)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
    ]
}

fn at(permille: u16, len: usize) -> usize {
    len * usize::from(permille) / 1000
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scan_of_arbitrary_bytes_never_panics_and_is_consistent(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let s = spool::scan(&bytes);
        check_consistent(&bytes, &s)?;
    }

    #[test]
    fn scan_of_arbitrary_frames_after_a_valid_header_is_consistent(
        h in header_strategy(),
        tail in prop::collection::vec(any::<u8>(), 0..256),
        frames in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..24)), 0..4),
        cut in 0usize..400,
    ) {
        // Valid frames followed by noise, cut anywhere: exercises the frame parser and the tail
        // count far more than random bytes, which rarely get past the header's crc.
        let mut img = image(h, &frames);
        img.extend(tail);
        img.truncate(cut.max(HEADER_LEN as usize));
        let s = spool::scan(&img);
        check_consistent(&img, &s)?;
        prop_assert_eq!(s.header, Some(h));
    }

    #[test]
    fn scan_of_a_damaged_image_returns_a_prefix_of_its_frames(
        h in header_strategy(),
        frames in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..8),
        damage in prop::collection::vec(damage_strategy(), 1..3),
    ) {
        let img = image(h, &frames);
        let original = spool::scan(&img);
        prop_assert_eq!(original.frames.len(), frames.len());
        prop_assert_eq!(original.corrupt_bytes, 0);

        let mut bad = img.clone();
        for d in &damage {
            match d {
                Damage::Truncate(p) => bad.truncate(at(*p, bad.len())),
                Damage::Flip(p, mask) => {
                    if !bad.is_empty() {
                        let i = at(*p, bad.len()).min(bad.len() - 1);
                        bad[i] ^= mask;
                    }
                }
                Damage::Append(g) => bad.extend_from_slice(g),
            }
        }
        // The first byte of the original changed or missing (a cut followed by an append can
        // put back what was cut): no frame ending after it may survive.
        let first_damage = (0..img.len())
            .find(|&i| bad.get(i) != img.get(i))
            .unwrap_or(img.len());
        let s = spool::scan(&bad);
        check_consistent(&bad, &s)?;
        if first_damage < HEADER_LEN as usize {
            prop_assert_eq!(s.header, None, "a damaged or cut header must not pass");
            return Ok(());
        }
        prop_assert_eq!(s.header, Some(h));
        // Exactly the frames wholly before the first damage (a crc32 catches any change of up
        // to 32 bits; garbage appended past the frames would need to forge one).
        let intact = original.frames.iter().take_while(|f| f.end() as usize <= first_damage).count();
        prop_assert_eq!(&s.frames[..], &original.frames[..intact]);
    }
}

// ---- the spool on real files ----

#[derive(Debug, Clone)]
enum Op {
    Append {
        kind: u8,
        len: usize,
        fill: u8,
    },
    /// Acknowledge `floor - 2 + k` (some below the floor, some beyond next_seq).
    Ack(u64),
    Reopen,
    /// Close, cut the file to this fraction (per mille) of its length, reopen.
    Truncate(u16),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Appends outnumber acks, so the cap is reached (outages) as well as kept clear.
    prop_oneof![
        10 => (any::<u8>(), prop_oneof![0usize..64, 0usize..900], any::<u8>())
            .prop_map(|(kind, len, fill)| Op::Append { kind, len, fill }),
        2 => (0u64..12).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
        // Cuts anywhere, near the tail (a torn last frame), or none at all.
        1 => prop_oneof![0u16..=1000, 950u16..=1000, Just(1000)].prop_map(Op::Truncate),
    ]
}

fn payload(seq: u64, len: usize, fill: u8) -> Vec<u8> {
    // The seq in the first bytes: a record served under the wrong seq cannot match.
    let mut p = seq.to_le_bytes().to_vec();
    p.resize(len.max(8), fill);
    p
}

/// What the test knows about the stream: every record appended, by seq (a seq re-issued after
/// a truncation lost its frame replaces the entry).
struct Model {
    stream_id: u64,
    appended: BTreeMap<u64, (u8, Vec<u8>)>,
}

/// The spool holds exactly the records `floor..next_seq`, each as appended.
fn check_records(s: &Spool, m: &Model) -> Result<(), TestCaseError> {
    let st = s.stats();
    let recs = s
        .records_from(0, usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(recs.len() as u64, st.pending_records);
    prop_assert_eq!(st.next_seq - st.floor, st.pending_records);
    for (i, r) in recs.iter().enumerate() {
        prop_assert_eq!(r.seq, st.floor + i as u64, "contiguous from the floor");
        let (kind, p) = m
            .appended
            .get(&r.seq)
            .ok_or_else(|| TestCaseError::fail(format!("seq {} never appended", r.seq)))?;
        prop_assert_eq!((r.kind, &r.payload), (*kind, p));
    }
    prop_assert!(st.file_bytes <= CAP);
    Ok(())
}

const CAP: u64 = spool::MIN_MAX_BYTES * 2;

fn reopen(dir: &Path) -> Result<(Spool, spool::Recovery), TestCaseError> {
    Spool::open(dir, CAP).map_err(|e| TestCaseError::fail(e.to_string()))
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join(FILE_NAME);
    let (s, r) = reopen(dir.path())?;
    prop_assert!(r.created);
    let mut m = Model {
        stream_id: s.stream_id(),
        appended: BTreeMap::new(),
    };
    let mut spool = Some(s);
    for op in ops {
        let s = spool
            .as_mut()
            .ok_or_else(|| TestCaseError::fail("no spool"))?;
        match op {
            Op::Append { kind, len, fill } => {
                let seq = s.next_seq();
                let p = payload(seq, *len, *fill);
                let got = s
                    .append(*kind, &p)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, seq);
                prop_assert_eq!(s.next_seq(), seq + 1);
                m.appended.insert(seq, (*kind, p));
            }
            Op::Ack(k) => {
                let (floor, next) = (s.floor(), s.next_seq());
                let upto = (floor + k).saturating_sub(2);
                let released = s
                    .ack(upto)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expect = upto.min(next - 1).saturating_sub(floor - 1);
                prop_assert_eq!(released, expect);
                prop_assert_eq!(s.floor(), floor + expect);
                prop_assert_eq!(s.next_seq(), next);
            }
            Op::Reopen => {
                let before = s.stats();
                drop(spool.take());
                let (s, r) = reopen(dir.path())?;
                let after = s.stats();
                prop_assert_eq!(
                    (r.stream_id, r.created, r.corrupt_frames, r.note.as_deref()),
                    (m.stream_id, false, 0, None)
                );
                prop_assert_eq!(
                    after.next_seq,
                    before.next_seq,
                    "a clean reopen keeps the numbering"
                );
                prop_assert!(
                    after.floor <= before.floor,
                    "unacknowledged records are all kept"
                );
                prop_assert_eq!(
                    (after.dropped, after.corrupt),
                    (before.dropped, before.corrupt)
                );
                prop_assert_eq!(r.records, after.pending_records);
                spool = Some(s);
            }
            Op::Truncate(p) => {
                let before = s.stats();
                drop(spool.take());
                let bytes = std::fs::read(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let cut = at(*p, bytes.len());
                let full = spool::scan(&bytes);
                let cut_scan = spool::scan(&bytes[..cut]);
                prop_assert_eq!(full.corrupt_bytes, 0, "the spool left a damaged file");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(cut as u64))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (s, r) = reopen(dir.path())?;
                let after = s.stats();
                match (full.header, cut_scan.header) {
                    (Some(h), Some(_)) => {
                        // Same stream: the frames wholly before the cut, nothing else.
                        let kept = full
                            .frames
                            .iter()
                            .take_while(|f| f.end() as usize <= cut)
                            .count() as u64;
                        prop_assert_eq!(
                            (r.stream_id, r.created, r.records),
                            (m.stream_id, false, kept)
                        );
                        prop_assert_eq!(
                            after.floor,
                            h.base_seq,
                            "numbering never restarts below the last compaction"
                        );
                        prop_assert_eq!(after.next_seq, h.base_seq + kept);
                        if cut == bytes.len() {
                            prop_assert_eq!(after.next_seq, before.next_seq);
                        }
                        prop_assert_eq!(r.corrupt_frames, cut_scan.corrupt_frames);
                        prop_assert_eq!(after.corrupt, before.corrupt + cut_scan.corrupt_frames);
                        prop_assert_eq!(after.dropped, before.dropped);
                    }
                    (Some(_), None) => {
                        // Cut inside the header: a new stream, the old bytes kept aside.
                        prop_assert!(r.created);
                        prop_assert!(r.note.is_some());
                        prop_assert_ne!(r.stream_id, m.stream_id);
                        prop_assert_eq!((after.next_seq, after.floor, r.records), (1, 1, 0));
                        prop_assert_eq!((after.corrupt, after.dropped), (u64::from(cut > 0), 0));
                        let aside = std::fs::read_dir(dir.path())
                            .map_err(|e| TestCaseError::fail(e.to_string()))?
                            .filter_map(|e| e.ok())
                            .filter(|e| {
                                e.file_name()
                                    .to_string_lossy()
                                    .starts_with("spool.bin.corrupt-")
                            })
                            .any(|e| {
                                std::fs::read(e.path()).ok().as_deref() == Some(&bytes[..cut])
                            });
                        prop_assert_eq!(
                            aside,
                            cut > 0,
                            "a non-empty damaged file is moved aside intact"
                        );
                        m = Model {
                            stream_id: r.stream_id,
                            appended: BTreeMap::new(),
                        };
                    }
                    (None, _) => prop_assert!(false, "the spool left a file without a header"),
                }
                spool = Some(s);
            }
        }
        let s = spool
            .as_ref()
            .ok_or_else(|| TestCaseError::fail("no spool"))?;
        check_records(s, &m)?;
        // Whatever happened, the file on disk scans clean and matches the spool's view.
        let bytes = std::fs::read(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let on_disk = spool::scan(&bytes);
        prop_assert_eq!(on_disk.corrupt_bytes, 0);
        prop_assert_eq!(on_disk.next_seq(), Some(s.next_seq()));
        prop_assert_eq!(
            on_disk.header.map(|h| (h.stream_id, h.dropped, h.corrupt)),
            Some((m.stream_id, s.stats().dropped, s.stats().corrupt))
        );
        prop_assert_eq!(bytes.len() as u64, s.stats().file_bytes);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: file_cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn spool_ops_reopens_and_truncations_keep_records_and_numbering(
        ops in prop::collection::vec(op_strategy(), 1..100),
    ) {
        run_ops(&ops)?;
    }
}

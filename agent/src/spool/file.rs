//! The [`Spool`] itself: the directory and its lock, appends with their fsync, cumulative
//! acks and compaction, the cap, and the one way `spool.bin` is ever replaced (temp file, fsync,
//! rename, directory fsync). Also the positioned-I/O helpers the other parts share.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::format::{
    encode_frame, read_frame, FrameIndex, Header, SliceSource, BODY_FIXED, FRAME_OVERHEAD,
    HEADER_LEN, MAX_PAYLOAD,
};
use super::recovery::{self, Recovery};
use super::{io_err, SpoolError, FILE_NAME, LOCK_NAME, MIN_MAX_BYTES, TMP_NAME};

/// The acknowledged prefix is cut off once it is at least this large (and at least the live
/// data), so a slow trickle of acks does not rewrite the file at every ack.
const COMPACT_MIN_BYTES: u64 = 64 * 1024;

/// One record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// Counters for telemetry and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    /// Records held and not yet acknowledged (`next_seq - floor`).
    pub pending_records: u64,
    /// Bytes of those records in the file (frames included).
    pub pending_bytes: u64,
    /// Size of `spool.bin` (header and acknowledged records not yet compacted included).
    pub file_bytes: u64,
    /// Unacknowledged records dropped at the cap, over the life of the stream.
    pub dropped: u64,
    /// Frames lost to damage found at open, over the life of the stream.
    pub corrupt: u64,
    pub next_seq: u64,
    pub floor: u64,
}

#[cfg(unix)]
pub(super) fn read_at(file: &File, pos: u64, buf: &mut [u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, pos)
}

#[cfg(not(unix))]
pub(super) fn read_at(mut file: &File, pos: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(pos))?;
    file.read_exact(buf)
}

#[cfg(unix)]
pub(super) fn write_at(file: &File, pos: u64, buf: &[u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, pos)
}

#[cfg(not(unix))]
pub(super) fn write_at(mut file: &File, pos: u64, buf: &[u8]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(pos))?;
    file.write_all(buf)
}

/// Makes renames and creations in `dir` durable.
#[cfg(unix)]
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(super) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// A stream id unlikely to repeat across devices and re-creations: std's per-process random
/// hash keys (seeded from the OS) over the time in nanoseconds and the pid.
fn new_stream_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// The bounded on-disk spool (see the module docs). Not thread-safe by itself: the agent keeps
/// it under a `Mutex`.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Holds the advisory lock on `spool.lock` until dropped.
    _lock: File,
    max_bytes: u64,
    /// The header as on disk; the counters only change through a rewrite, so it is current.
    header: Header,
    /// Every frame in the file: `index[i].seq == header.base_seq + i`.
    index: VecDeque<FrameIndex>,
    /// Highest seq acknowledged (or dropped); `base_seq - 1 <= acked < next_seq`.
    acked: u64,
    /// Length of `spool.bin` (end of the last frame).
    file_len: u64,
}

impl Spool {
    /// Opens the spool in `dir` (creating the directory and file if needed) and recovers it
    /// (see the module docs). Takes an exclusive advisory lock so two agents cannot share one
    /// spool: [`SpoolError::Locked`].
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Recovery), SpoolError> {
        if max_bytes < MIN_MAX_BYTES {
            return Err(SpoolError::InvalidCap(max_bytes));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // `File::try_lock` is std since 1.89 (flock on Linux): held until `lock` is dropped,
        // per open file, so a second `open` in the same process is refused too.
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let tmp = dir.join(TMP_NAME);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
            _ => {}
        }
        let path = dir.join(FILE_NAME);
        let existing = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut recovery = Recovery {
            stream_id: 0,
            created: false,
            records: 0,
            corrupt_frames: 0,
            corrupt_bytes: 0,
            note: None,
        };
        let found = match existing {
            Some(file) => recovery::examine(dir, &path, file, &mut recovery)?,
            None => None,
        };
        // What the spool starts from: the file found (with its frames), or a new one.
        let (file, header, file_len, index, scan) = match found {
            Some((file, header, scan)) => {
                recovery.corrupt_frames = scan.corrupt_frames;
                recovery.corrupt_bytes = scan.corrupt_bytes;
                let (len, frames) = (scan.valid_len, scan.frames.into());
                (file, header, len, frames, Some(scan.corrupt_bytes))
            }
            None => {
                let header = Header {
                    stream_id: new_stream_id(),
                    base_seq: 1,
                    dropped: 0,
                    corrupt: recovery.corrupt_frames,
                };
                let file = write_new_file(dir, &path, &header, None)?;
                sync_dir(dir).map_err(io_err(dir))?;
                recovery.created = true;
                (file, header, HEADER_LEN, VecDeque::new(), None)
            }
        };
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            path,
            file,
            _lock: lock,
            max_bytes,
            header,
            acked: header.base_seq - 1,
            file_len,
            index,
        };
        if let Some(corrupt_bytes) = scan {
            // A file above the cap (the cap was lowered): cut down as an append would.
            let (keep_from, dropped) = if spool.file_len > max_bytes {
                spool.plan_room(0)
            } else {
                (0, 0)
            };
            if dropped > 0 {
                recovery.note = Some(format!(
                    "{FILE_NAME} exceeded max_bytes = {max_bytes}; dropped the {dropped} oldest records"
                ));
            }
            if keep_from > 0 || corrupt_bytes > 0 {
                let mut h = spool.header;
                h.dropped = h.dropped.saturating_add(dropped);
                h.corrupt = h.corrupt.saturating_add(recovery.corrupt_frames);
                spool.rewrite(keep_from, h)?;
            }
        }
        spool.acked = spool.header.base_seq - 1;
        recovery.stream_id = spool.header.stream_id;
        recovery.records = spool.index.len() as u64;
        Ok((spool, recovery))
    }

    pub fn stream_id(&self) -> u64 {
        self.header.stream_id
    }

    /// Appends one record and fsyncs it before returning its seq. Makes room first if the
    /// file would exceed the cap (module docs, "Cap policy").
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, SpoolError> {
        let max = (self.max_bytes / 2 - FRAME_OVERHEAD).min(MAX_PAYLOAD as u64);
        if payload.len() as u64 > max {
            return Err(SpoolError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let seq = self.next_seq();
        if seq.checked_add(1).is_none() {
            return Err(io_err(&self.path)(io::Error::other(
                "sequence numbers exhausted",
            )));
        }
        let frame_len = FRAME_OVERHEAD + payload.len() as u64;
        if self.file_len + frame_len > self.max_bytes {
            let (keep_from, dropped) = self.plan_room(frame_len);
            let mut h = self.header;
            h.dropped = h.dropped.saturating_add(dropped);
            self.rewrite(keep_from, h)?;
        }
        let frame = encode_frame(seq, kind, payload);
        let offset = self.file_len;
        let written = write_at(&self.file, offset, &frame).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no partial frame behind for the next append to land after.
            let _ = self.file.set_len(offset);
            return Err(io_err(&self.path)(e));
        }
        self.index.push_back(FrameIndex {
            seq,
            kind,
            offset,
            len: frame_len,
        });
        self.file_len += frame_len;
        Ok(seq)
    }

    /// Cumulative ack: every record with `seq <= upto` was delivered. Acks at or below what
    /// is already acknowledged change nothing; acks beyond `next_seq - 1` are clamped. Returns
    /// how many records were released, and compacts when everything is acknowledged or the
    /// acknowledged prefix is at least `max(64 KiB, live bytes)`. On a compaction error the
    /// ack still holds in memory (the old file stays valid; a later compaction retries).
    pub fn ack(&mut self, upto: u64) -> Result<u64, SpoolError> {
        let upto = upto.min(self.next_seq() - 1);
        if upto <= self.acked {
            return Ok(0);
        }
        let released = upto - self.acked;
        self.acked = upto;
        let first_live = self.first_unacked();
        let acked_bytes = self.live_offset() - HEADER_LEN;
        let all_acked = first_live == self.index.len();
        if first_live > 0 && (all_acked || acked_bytes >= COMPACT_MIN_BYTES.max(self.live_bytes()))
        {
            self.rewrite(first_live, self.header)?;
        }
        Ok(released)
    }

    /// Seq of the oldest record still held unacknowledged (`next_seq` when none): everything
    /// below it was acknowledged or dropped and will never be sent again.
    pub fn floor(&self) -> u64 {
        self.acked + 1
    }

    pub fn next_seq(&self) -> u64 {
        self.header.base_seq + self.index.len() as u64
    }

    /// Up to `max` unacknowledged records with `seq >= from`, in seq order. Payloads are read
    /// from the file (positioned reads) and their checksums verified again; a frame that no
    /// longer verifies is an error here, and is cut off by the recovery of the next open.
    pub fn records_from(&self, from: u64, max: usize) -> Result<Vec<Record>, SpoolError> {
        let start = from.max(self.floor());
        let next = self.next_seq();
        if start >= next || max == 0 {
            return Ok(Vec::new());
        }
        let first = (start - self.header.base_seq) as usize;
        let mut out = Vec::with_capacity(max.min(self.index.len() - first));
        let mut buf = Vec::new();
        for f in self.index.range(first..).take(max) {
            buf.resize(f.len as usize, 0);
            read_at(&self.file, f.offset, &mut buf).map_err(io_err(&self.path))?;
            let mut src = SliceSource(&buf);
            let mut body = Vec::new();
            let ok = read_frame(&mut src, 0, f.len, &mut body)
                .unwrap_or_else(|never| match never {})
                .is_some_and(|r| r.seq == f.seq && r.kind == f.kind && r.len == f.len);
            if !ok {
                return Err(io_err(&self.path)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "frame of seq {} at offset {} fails its checksum",
                        f.seq, f.offset
                    ),
                )));
            }
            out.push(Record {
                seq: f.seq,
                kind: f.kind,
                payload: body.split_off(BODY_FIXED as usize),
            });
        }
        Ok(out)
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending_records: self.next_seq() - self.floor(),
            pending_bytes: self.live_bytes(),
            file_bytes: self.file_len,
            dropped: self.header.dropped,
            corrupt: self.header.corrupt,
            next_seq: self.next_seq(),
            floor: self.floor(),
        }
    }

    /// Index in `index` of the first unacknowledged frame (`index.len()` when none).
    fn first_unacked(&self) -> usize {
        // acked >= base_seq - 1, and acked - base_seq + 1 <= index.len().
        (self.acked + 1 - self.header.base_seq) as usize
    }

    /// Offset of the first unacknowledged frame (`file_len` when none).
    fn live_offset(&self) -> u64 {
        self.index
            .get(self.first_unacked())
            .map_or(self.file_len, |f| f.offset)
    }

    fn live_bytes(&self) -> u64 {
        self.file_len - self.live_offset()
    }

    /// Which frames to keep so that header + kept frames + `extra` bytes fit in 90 % of the
    /// cap: every acknowledged frame goes, then the oldest unacknowledged ones. Returns the
    /// index of the first frame kept and how many unacknowledged ones go.
    fn plan_room(&self, extra: u64) -> (usize, u64) {
        let target = (u128::from(self.max_bytes) * 9 / 10) as u64;
        let first_live = self.first_unacked();
        let mut keep = first_live;
        while let Some(f) = self.index.get(keep) {
            if HEADER_LEN + (self.file_len - f.offset) + extra <= target {
                break;
            }
            keep += 1;
        }
        (keep, (keep - first_live) as u64)
    }

    /// Replaces `spool.bin` with `header` (its `base_seq` set here) and the frames from
    /// `index[keep_from]` on: temp file, fsync, rename, fsync of the directory. Nothing changes
    /// if it fails before the rename.
    fn rewrite(&mut self, keep_from: usize, mut header: Header) -> Result<(), SpoolError> {
        header.base_seq = self.header.base_seq + keep_from as u64;
        let src_off = self
            .index
            .get(keep_from)
            .map_or(self.file_len, |f| f.offset);
        let file = write_new_file(
            &self.dir,
            &self.path,
            &header,
            Some((&self.file, src_off, self.file_len)),
        )?;
        // The new file is in place: from here on the state must follow it.
        self.file = file;
        self.index.drain(..keep_from);
        for f in &mut self.index {
            f.offset = f.offset - src_off + HEADER_LEN;
        }
        self.file_len = HEADER_LEN + (self.file_len - src_off);
        self.header = header;
        self.acked = self.acked.max(header.base_seq - 1);
        sync_dir(&self.dir).map_err(io_err(&self.dir))
    }
}

/// Writes `header` and the bytes `[from, to)` of `src` to the temp file, fsyncs it and renames
/// it over `path`. Returns the handle, which is `path` from then on. On failure before the
/// rename the temp file is removed (best effort) and `path` is untouched.
fn write_new_file(
    dir: &Path,
    path: &Path,
    header: &Header,
    src: Option<(&File, u64, u64)>,
) -> Result<File, SpoolError> {
    let tmp = dir.join(TMP_NAME);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        write_at(&file, 0, &header.encode()).map_err(io_err(&tmp))?;
        if let Some((src, from, to)) = src {
            let mut buf = vec![0u8; 64 * 1024];
            let mut pos = from;
            while pos < to {
                let n = (to - pos).min(buf.len() as u64) as usize;
                read_at(src, pos, &mut buf[..n]).map_err(io_err(path))?;
                write_at(&file, HEADER_LEN + (pos - from), &buf[..n]).map_err(io_err(&tmp))?;
                pos += n as u64;
            }
        }
        file.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Ok(file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn append_ack_reopen_keeps_seqs_increasing_and_payloads_intact() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, r) = open(d.path());
        assert!(r.created && r.note.is_none());
        assert_eq!((r.records, s.next_seq(), s.floor()), (0, 1, 1));
        let stream = s.stream_id();
        for i in 1..=5 {
            assert_eq!(s.append(i as u8, &payload(i)).unwrap(), i);
        }
        assert_eq!(s.ack(2).unwrap(), 2);
        drop(s);

        // Acks are not persisted before compaction: 1..=2 come back (the relay de-duplicates).
        let (mut s, r) = open(d.path());
        assert_eq!((r.stream_id, r.created, r.records), (stream, false, 5));
        assert_eq!((s.floor(), s.next_seq()), (1, 6));
        let recs = all(&s);
        assert_eq!(recs.len(), 5);
        for (i, r) in (1..).zip(&recs) {
            assert_eq!(
                r,
                &Record {
                    seq: i,
                    kind: i as u8,
                    payload: payload(i)
                }
            );
        }
        // Everything acknowledged: header-only file whose base keeps the numbering going.
        assert_eq!(s.ack(5).unwrap(), 5);
        assert_eq!(s.stats().file_bytes, HEADER_LEN);
        assert_eq!(std::fs::metadata(file(d.path())).unwrap().len(), HEADER_LEN);
        drop(s);
        let (mut s, r) = open(d.path());
        assert_eq!(
            (r.stream_id, r.records, s.next_seq(), s.floor()),
            (stream, 0, 6, 6)
        );
        assert_eq!(s.append(9, b"six").unwrap(), 6);
        drop(s);
        let (s, _) = open(d.path());
        assert_eq!(
            all(&s),
            vec![Record {
                seq: 6,
                kind: 9,
                payload: b"six".to_vec()
            }]
        );
    }

    #[test]
    fn acks_below_or_beyond_are_ignored_or_clamped() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = open(d.path());
        assert_eq!(s.ack(0).unwrap(), 0);
        assert_eq!(s.ack(100).unwrap(), 0, "nothing to acknowledge yet");
        for i in 1..=4 {
            s.append(0, &payload(i)).unwrap();
        }
        assert_eq!(s.ack(2).unwrap(), 2);
        assert_eq!(s.ack(1).unwrap(), 0);
        assert_eq!(s.ack(2).unwrap(), 0);
        assert_eq!(s.ack(u64::MAX).unwrap(), 2, "clamped to next_seq - 1");
        assert_eq!((s.floor(), s.next_seq()), (5, 5));
        assert_eq!(s.stats().pending_records, 0);
    }

    #[test]
    fn ack_compacts_a_large_acknowledged_prefix_only() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = open(d.path());
        let big = vec![7u8; 1000];
        for _ in 0..100 {
            s.append(1, &big).unwrap();
        }
        let frame = FRAME_OVERHEAD + 1000;
        // 10 frames acknowledged: below 64 KiB, no rewrite.
        s.ack(10).unwrap();
        assert_eq!(s.stats().file_bytes, HEADER_LEN + 100 * frame);
        assert_eq!(s.stats().pending_bytes, 90 * frame);
        // 70 acknowledged: > 64 KiB and more than the 30 live frames, so the prefix goes.
        s.ack(70).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.file_bytes, st.pending_bytes),
            (HEADER_LEN + 30 * frame, 30 * frame)
        );
        assert_eq!((st.floor, st.next_seq, st.pending_records), (71, 101, 30));
        let recs = all(&s);
        assert_eq!(recs.first().map(|r| r.seq), Some(71));
        assert!(recs.iter().all(|r| r.payload == big));
        drop(s);
        let (s, r) = open(d.path());
        assert_eq!((r.records, s.floor(), s.next_seq()), (30, 71, 101));
    }

    #[test]
    fn records_from_respects_floor_from_and_max() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = open(d.path());
        for i in 1..=10 {
            s.append(0, &payload(i)).unwrap();
        }
        s.ack(3).unwrap();
        let seqs = |v: Vec<Record>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(s.records_from(0, 2).unwrap()), vec![4, 5]);
        assert_eq!(seqs(s.records_from(8, 100).unwrap()), vec![8, 9, 10]);
        assert_eq!(seqs(s.records_from(10, 1).unwrap()), vec![10]);
        assert!(s.records_from(11, 5).unwrap().is_empty());
        assert!(s.records_from(4, 0).unwrap().is_empty());
        assert_eq!(s.records_from(6, 1).unwrap()[0].payload, payload(6));
    }

    #[test]
    fn cap_drops_oldest_counts_only_unacked_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let cap = MIN_MAX_BYTES;
        let (mut s, _) = Spool::open(d.path(), cap).unwrap();
        let p = vec![1u8; 183]; // 200-byte frames
        let frame = 200;
        for _ in 0..20 {
            s.append(0, &p).unwrap(); // 44 + 20 * 200 = 4044 <= 4096
        }
        assert_eq!(s.stats().dropped, 0);
        s.ack(2).unwrap(); // 2 acked, not compacted (small prefix)
        assert_eq!(s.stats().file_bytes, HEADER_LEN + 20 * frame);
        // Seq 21 would exceed the cap: acked 1..=2 go free, then unacked ones until
        // 44 + live + 200 <= 3686 (90 %), i.e. live <= 3442: seq 3 goes, 4..=20 (3400) stay.
        assert_eq!(s.append(0, &p).unwrap(), 21);
        let st = s.stats();
        assert_eq!(st.dropped, 1, "only seq 3 counts; 1..=2 were acked");
        assert_eq!((st.floor, st.next_seq, st.pending_records), (4, 22, 18));
        assert_eq!(st.file_bytes, HEADER_LEN + 18 * frame);
        assert_eq!(all(&s).first().map(|r| r.seq), Some(4));
        // Hysteresis: the next appends fit in the 10 % freed, no rewrite, no drop.
        s.append(0, &p).unwrap();
        assert_eq!(s.stats().dropped, 1);
        for _ in 0..50 {
            s.append(0, &p).unwrap();
            assert!(s.stats().file_bytes <= cap);
        }
        let st = s.stats();
        drop(s);
        let (s, r) = Spool::open(d.path(), cap).unwrap();
        let st2 = s.stats();
        assert_eq!(
            (st2.dropped, st2.next_seq, st2.floor),
            (st.dropped, st.next_seq, st.floor)
        );
        assert_eq!(r.records, st.pending_records);
    }

    #[test]
    fn lowered_cap_cuts_the_file_at_open() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(d.path(), 3 * MIN_MAX_BYTES).unwrap();
        for _ in 0..50 {
            s.append(0, &[2u8; 183]).unwrap();
        }
        drop(s);
        let (s, r) = Spool::open(d.path(), MIN_MAX_BYTES).unwrap();
        let st = s.stats();
        assert!(st.file_bytes <= MIN_MAX_BYTES * 9 / 10);
        assert_eq!(st.dropped, 50 - r.records);
        assert_eq!(st.next_seq, 51);
        assert!(r.note.unwrap().contains("max_bytes"));
    }

    #[test]
    fn second_open_while_the_first_is_alive_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = open(d.path());
        let err = Spool::open(d.path(), CAP).unwrap_err();
        assert!(
            matches!(err, SpoolError::Locked(ref p) if p == d.path()),
            "{err}"
        );
        drop(s);
        // Released with the spool.
        open(d.path());
    }

    #[test]
    fn too_large_and_invalid_cap() {
        let d = tempfile::tempdir().unwrap();
        let err = Spool::open(d.path(), MIN_MAX_BYTES - 1).unwrap_err();
        assert!(matches!(err, SpoolError::InvalidCap(4095)), "{err}");
        let (mut s, _) = Spool::open(d.path(), MIN_MAX_BYTES).unwrap();
        let max = MIN_MAX_BYTES / 2 - FRAME_OVERHEAD;
        let err = s.append(0, &vec![0; max as usize + 1]).unwrap_err();
        assert!(
            matches!(err, SpoolError::TooLarge { len, max: m } if len == max as usize + 1 && m == max),
            "{err}"
        );
        assert_eq!(s.next_seq(), 1, "nothing consumed");
        assert_eq!(s.append(0, &vec![0; max as usize]).unwrap(), 1);
        // The per-frame ceiling holds for huge caps too.
        let d2 = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(d2.path(), 1 << 30).unwrap();
        let err = s.append(0, &vec![0; MAX_PAYLOAD + 1]).unwrap_err();
        assert!(matches!(err, SpoolError::TooLarge { max, .. } if max == MAX_PAYLOAD as u64));
    }
}

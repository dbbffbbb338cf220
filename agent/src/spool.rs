//! The on-disk store-and-forward spool: telemetry reports, calibration reports and config acks
//! wait here until the relay acknowledges them end to end (see [`crate::forward`]).
//!
//! # What it owns
//!
//! One directory (`<state_dir>/spool`) holding:
//!
//! - `spool.bin` ([`FILE_NAME`]): the records, in the format below. The only file that matters.
//! - `spool.lock` ([`LOCK_NAME`]): empty; an exclusive advisory lock on it is held for the
//!   [`Spool`]'s lifetime, so two agents pointed at one state directory fail at start
//!   ([`SpoolError::Locked`]) instead of interleaving frames. The lock is on a separate file
//!   because compaction *replaces* `spool.bin` by rename: a lock taken on `spool.bin` would stay
//!   on the old inode, and a second process opening the new file would find it unlocked. The
//!   lock file is never renamed, so its lock covers every generation of `spool.bin`. (It is
//!   advisory: it keeps out other `edge-agent`s, not an operator with `rm`.)
//! - `spool.bin.tmp`: scratch of a compaction in progress; a leftover one is deleted at open (it
//!   is a copy of records `spool.bin` still holds, or of a rewrite that never took effect).
//! - `spool.bin.corrupt-<unix ms>`: a `spool.bin` whose header was unreadable, moved aside at open
//!   for a human to look at. Data is never deleted by recovery.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! header, HEADER_LEN = 44 bytes
//!   magic     8  b"TIERDSP1"
//!   stream_id 8  random, drawn when the file is created; never changes afterwards
//!   base_seq  8  seq of the first frame the file may hold (>= 1)
//!   dropped   8  running total of unacknowledged records dropped at the cap
//!   corrupt   8  running total of frames lost to damage found at open
//!   crc32     4  of the 40 bytes above
//! frames, back to back, seqs contiguous from base_seq
//!   len       4  bytes after the crc field: 9 + payload length (at most 9 + MAX_PAYLOAD)
//!   crc32     4  of seq || kind || payload (crc32fast, IEEE)
//!   seq       8
//!   kind      1  a tierd_protocol::RecordKind, opaque here
//!   payload   len - 9
//! ```
//!
//! The counters live in the header so they survive restarts; they only change when the header
//! is rewritten anyway (compaction, recovery). `base_seq` is what keeps sequence numbers
//! increasing across restarts: when everything is acknowledged, compaction leaves a header-only
//! file with `base_seq = next_seq`, so a restart continues the numbering instead of starting at
//! 1 again — which matters because the relay de-duplicates by `(stream_id, seq)` and would
//! discard a reused seq as a duplicate. A new `stream_id` is drawn only when a new file is
//! started (first start, or an unreadable header), and with it numbering starts at 1.
//!
//! The frame's crc covers its seq and kind, so a frame from some other position or generation
//! cannot pass for this one, and a `len` beyond `9 + MAX_PAYLOAD` is read as damage, never as
//! an allocation to make. [`scan`] is the one parser of this format (recovery uses it, the fuzz
//! tests hammer it); it never panics and never trusts a length before bounds-checking it.
//!
//! # Fsync policy
//!
//! - [`Spool::append`] writes the frame at the end and calls `sync_data` before returning the
//!   seq: a seq handed out is on disk. Records are rare (a few per 30 s), so one fsync each is
//!   cheap, and it is what makes "the record leaves only when acknowledged" true across power
//!   loss. A failed write or fsync truncates the frame away again (best effort) and returns the
//!   error; the seq is not consumed.
//! - Every rewrite (compaction, cap drops, recovery) writes the survivors to `spool.bin.tmp`,
//!   `sync_all`s it, renames it over `spool.bin` and fsyncs the directory. A crash at any point
//!   leaves either the old file or the new one, each complete and valid. The handle used to
//!   write the temp file *is* the new `spool.bin` after the rename, so no reopen can fail
//!   half-way and leave us appending to an unlinked inode.
//!
//! # Acknowledgements and compaction
//!
//! Acks are cumulative ([`Spool::ack`]) and kept in memory only: persisting each one would cost
//! an fsync per ack for no gain, since the relay de-duplicates. So after a crash, records acked
//! but not yet compacted away are sent again, and the relay discards them as duplicates. The
//! file is compacted (acknowledged prefix cut off by a rewrite) when everything is acknowledged
//! — the steady state when the link is up, and it keeps the file at one header — or when the
//! acknowledged prefix reaches `max(64 KiB, live bytes)`, which bounds the wasted space and
//! makes the copying amortized O(1) per record (each rewrite copies at most as many live bytes
//! as it frees).
//!
//! # Cap policy
//!
//! The file never exceeds `max_bytes` (at least [`MIN_MAX_BYTES`]). When an append would cross
//! it, the oldest records are dropped — acknowledged ones first (free), then unacknowledged
//! ones, counted in `dropped` — until header + live data + the new frame fit in 90 % of the
//! cap. The 10 % of slack is hysteresis: during a long outage the file is rewritten once per
//! ~10 % of the cap rather than at every append. Dropping the *oldest* keeps the freshest
//! telemetry, the more useful after an outage; the relay learns what was dropped from the
//! `floor` carried by every record and counts it as skipped, not missing. One frame may not
//! exceed half the cap ([`SpoolError::TooLarge`]), so room can always be made. A file found
//! larger than the cap at open (the cap was lowered) is cut down the same way.
//!
//! # Recovery at open
//!
//! - No `spool.bin`: a new stream (new `stream_id`, `base_seq` 1).
//! - A `spool.bin` without a valid header (bad magic, bad crc, too short): moved aside to
//!   `spool.bin.corrupt-<unix ms>`, counted as one corrupt frame (how many records it held
//!   cannot be known), and a new stream is started; [`Recovery::note`] says so. An empty one
//!   (nothing to keep) is replaced by a new stream, also with a note. The relay sees a new
//!   `stream_id` either way.
//! - A valid header followed by a damaged tail (torn last write, checksum failure, seq out of
//!   order, implausible length): the valid prefix is kept, everything from the first bad frame
//!   on is cut off, and the frames lost are added to `corrupt` (counted by following the length
//!   fields through the tail; a torn tail counts as one frame). Cutting and counting are one
//!   atomic rewrite, not a truncate followed by a header update, so a crash between the two
//!   cannot lose the count. Frames after the first bad one are not salvaged: seqs must stay
//!   contiguous, and damage in the middle of a file that is only ever appended to means
//!   something worse than a torn write.
//! - `next_seq` is the last valid frame's seq + 1, or `base_seq` when there is none. Note the
//!   limit this implies: if damage destroys frames that were complete (fsynced and maybe already
//!   delivered), their seqs are handed out again, and the relay takes the new records under
//!   them for duplicates. A torn *last* frame is harmless (its append never returned). Guarding
//!   against the rest would need a seq high-water mark outside the damaged region, which the
//!   same flaky storage could lose as well.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The spool file in the spool directory.
pub const FILE_NAME: &str = "spool.bin";
/// Holder of the spool's advisory lock (see the module docs for why it is a separate file).
pub const LOCK_NAME: &str = "spool.lock";
/// Scratch file of a rewrite.
pub const TMP_NAME: &str = "spool.bin.tmp";
/// Smallest cap accepted: a few reports plus the header.
pub const MIN_MAX_BYTES: u64 = 4096;
/// First bytes of every spool file.
pub const MAGIC: [u8; 8] = *b"TIERDSP1";
/// Fixed size of the header.
pub const HEADER_LEN: u64 = 44;
/// Bytes of a frame besides its payload: len, crc, seq, kind.
pub const FRAME_OVERHEAD: u64 = 17;
/// Largest payload a frame may carry; a length beyond it is corruption.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest `base_seq` a valid header may carry, so `next_seq` cannot overflow in practice.
pub const MAX_BASE_SEQ: u64 = 1 << 62;

/// Bytes of a frame before the part the crc covers (len, crc).
const FRAME_PREFIX: u64 = 8;
/// Bytes covered by the crc besides the payload (seq, kind).
const BODY_FIXED: u32 = 9;
const MAX_BODY: u32 = BODY_FIXED + MAX_PAYLOAD as u32;
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

/// What [`Spool::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub stream_id: u64,
    /// A new stream was started (no usable file).
    pub created: bool,
    /// Records recovered (all pending: acknowledgements are not persisted).
    pub records: u64,
    /// Frames lost to damage at this open (also added to the `corrupt` total).
    pub corrupt_frames: u64,
    /// Bytes cut off or moved aside at this open.
    pub corrupt_bytes: u64,
    /// Anything an operator should know (file moved aside, records dropped to a lowered cap).
    pub note: Option<String>,
}

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("spool {} is locked by another process (another edge-agent with the same state_dir?)", .0.display())]
    Locked(PathBuf),
    #[error("record of {len} bytes exceeds the spool's limit of {max} bytes per record")]
    TooLarge { len: usize, max: u64 },
    #[error("spool max_bytes = {0} is below the minimum of {MIN_MAX_BYTES}")]
    InvalidCap(u64),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The fixed-size header of a spool file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub stream_id: u64,
    pub base_seq: u64,
    pub dropped: u64,
    pub corrupt: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.stream_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.dropped.to_le_bytes());
        b[32..40].copy_from_slice(&self.corrupt.to_le_bytes());
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header at the start of `bytes`, if it is one: magic, crc and `base_seq` in
    /// `1..=MAX_BASE_SEQ`.
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..HEADER_LEN as usize)?;
        if b[0..8] != MAGIC || crc32fast::hash(&b[0..40]) != le_u32(&b[40..44]) {
            return None;
        }
        let h = Header {
            stream_id: le_u64(&b[8..16]),
            base_seq: le_u64(&b[16..24]),
            dropped: le_u64(&b[24..32]),
            corrupt: le_u64(&b[32..40]),
        };
        (1..=MAX_BASE_SEQ).contains(&h.base_seq).then_some(h)
    }
}

/// Where a valid frame sits in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameIndex {
    pub seq: u64,
    pub kind: u8,
    /// Offset of the frame's first byte (its `len` field).
    pub offset: u64,
    /// Bytes of the whole frame on disk ([`FRAME_OVERHEAD`] + payload).
    pub len: u64,
}

impl FrameIndex {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    pub fn payload_len(&self) -> u64 {
        self.len - FRAME_OVERHEAD
    }
}

/// What [`scan`] found in a spool file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `None`: too short, bad magic, bad crc or out-of-range `base_seq`; then nothing else
    /// was parsed (`valid_len` 0, every byte corrupt, as one frame if there are any).
    pub header: Option<Header>,
    /// The valid frames, in file order; seqs contiguous from `header.base_seq`.
    pub frames: Vec<FrameIndex>,
    /// Bytes of the valid prefix (header and valid frames).
    pub valid_len: u64,
    /// Bytes after the valid prefix (`valid_len + corrupt_bytes` is the input length).
    pub corrupt_bytes: u64,
    /// Frames in those bytes (following their length fields while plausible; a remainder
    /// that is not a whole frame counts as one). Zero exactly when `corrupt_bytes` is.
    pub corrupt_frames: u64,
}

impl Scan {
    /// Seq the next appended frame would get (`None` without a header).
    pub fn next_seq(&self) -> Option<u64> {
        let h = self.header?;
        Some(self.frames.last().map_or(h.base_seq, |f| f.seq + 1))
    }
}

/// Parses a spool file image: header, then frames until the end or the first frame that is
/// truncated, has an implausible length, fails its checksum, or breaks seq contiguity. Pure,
/// never panics.
pub fn scan(bytes: &[u8]) -> Scan {
    match scan_source(&mut SliceSource(bytes)) {
        Ok(s) => s,
        Err(never) => match never {},
    }
}

/// Random access to the bytes being scanned: a slice (tests, fuzzing) or the file itself
/// (recovery, so a large spool is not read into memory at once).
trait Source {
    type Error;
    fn total_len(&self) -> u64;
    /// Fills `buf` from `pos`; the scanner only asks for ranges within `total_len`.
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

struct SliceSource<'a>(&'a [u8]);

impl Source for SliceSource<'_> {
    type Error = Infallible;
    fn total_len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> Result<(), Infallible> {
        let src = usize::try_from(pos)
            .ok()
            .and_then(|p| self.0.get(p..p.checked_add(buf.len())?));
        match src {
            Some(s) => buf.copy_from_slice(s),
            // Unreachable by construction; zeros would fail the checks rather than panic.
            None => buf.fill(0),
        }
        Ok(())
    }
}

struct FileSource<'a> {
    file: &'a File,
    len: u64,
}

impl Source for FileSource<'_> {
    type Error = io::Error;
    fn total_len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        read_at(self.file, pos, buf)
    }
}

fn scan_source<S: Source>(src: &mut S) -> Result<Scan, S::Error> {
    let total = src.total_len();
    let mut scan = Scan {
        header: None,
        frames: Vec::new(),
        valid_len: 0,
        corrupt_bytes: total,
        corrupt_frames: u64::from(total > 0),
    };
    if total < HEADER_LEN {
        return Ok(scan);
    }
    let mut hb = [0u8; HEADER_LEN as usize];
    src.read_at(0, &mut hb)?;
    let Some(header) = Header::decode(&hb) else {
        return Ok(scan);
    };
    scan.header = Some(header);
    let mut pos = HEADER_LEN;
    let mut expected = Some(header.base_seq);
    let mut body = Vec::new();
    while pos < total {
        let Some(frame) = read_frame(src, pos, total, &mut body)? else {
            break;
        };
        if Some(frame.seq) != expected {
            break;
        }
        expected = frame.seq.checked_add(1);
        pos = frame.end();
        scan.frames.push(frame);
    }
    scan.valid_len = pos;
    scan.corrupt_bytes = total - pos;
    scan.corrupt_frames = if scan.corrupt_bytes > 0 {
        count_tail_frames(src, pos, total)?
    } else {
        0
    };
    Ok(scan)
}

/// A frame's `len` field if the frame it announces is plausible and fits before `total`.
fn frame_body_len<S: Source>(src: &mut S, pos: u64, total: u64) -> Result<Option<u32>, S::Error> {
    if total.saturating_sub(pos) < FRAME_PREFIX {
        return Ok(None);
    }
    let mut lb = [0u8; 4];
    src.read_at(pos, &mut lb)?;
    let len = u32::from_le_bytes(lb);
    let fits = u64::from(len) <= total - pos - FRAME_PREFIX;
    Ok(((BODY_FIXED..=MAX_BODY).contains(&len) && fits).then_some(len))
}

/// The frame at `pos` if it is whole and its checksum holds (`body` is scratch space).
fn read_frame<S: Source>(
    src: &mut S,
    pos: u64,
    total: u64,
    body: &mut Vec<u8>,
) -> Result<Option<FrameIndex>, S::Error> {
    let Some(len) = frame_body_len(src, pos, total)? else {
        return Ok(None);
    };
    let mut cb = [0u8; 4];
    src.read_at(pos + 4, &mut cb)?;
    body.resize(len as usize, 0);
    src.read_at(pos + FRAME_PREFIX, body)?;
    if crc32fast::hash(body) != u32::from_le_bytes(cb) {
        return Ok(None);
    }
    Ok(Some(FrameIndex {
        seq: le_u64(&body[0..8]),
        kind: body[8],
        offset: pos,
        len: FRAME_PREFIX + u64::from(len),
    }))
}

/// How many frames a damaged tail held: follows the length fields while they are plausible
/// (the first bad frame's usually is: a torn write or a flipped payload byte), and counts a
/// remainder that is not a whole frame as one more.
fn count_tail_frames<S: Source>(src: &mut S, mut pos: u64, total: u64) -> Result<u64, S::Error> {
    let mut n = 0;
    while let Some(len) = frame_body_len(src, pos, total)? {
        n += 1;
        pos += FRAME_PREFIX + u64::from(len);
    }
    if pos < total {
        n += 1;
    }
    Ok(n)
}

/// The bytes of one frame, as [`Spool::append`] writes them. Never panics; a payload beyond
/// [`MAX_PAYLOAD`] would not scan back ([`Spool::append`] refuses one).
pub fn encode_frame(seq: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let body_len = BODY_FIXED as usize + payload.len();
    let mut f = Vec::with_capacity(FRAME_PREFIX as usize + body_len);
    f.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.push(kind);
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f[FRAME_PREFIX as usize..]);
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(unix)]
fn read_at(file: &File, pos: u64, buf: &mut [u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, pos)
}

#[cfg(not(unix))]
fn read_at(mut file: &File, pos: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(pos))?;
    file.read_exact(buf)
}

#[cfg(unix)]
fn write_at(file: &File, pos: u64, buf: &[u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, pos)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, pos: u64, buf: &[u8]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(pos))?;
    file.write_all(buf)
}

/// Makes renames and creations in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
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
        let mut found = None;
        if let Some(file) = existing {
            let len = file.metadata().map_err(io_err(&path))?.len();
            let scan = scan_source(&mut FileSource { file: &file, len }).map_err(io_err(&path))?;
            match scan.header {
                Some(header) => found = Some((file, header, scan)),
                None => {
                    drop(file);
                    recovery.note = Some(if len == 0 {
                        format!("{FILE_NAME} was empty; started a new stream")
                    } else {
                        let aside = move_aside(dir, &path)?;
                        // At least one record was lost; how many cannot be known, so it
                        // counts as one frame, as `scan` says.
                        recovery.corrupt_frames = scan.corrupt_frames;
                        recovery.corrupt_bytes = scan.corrupt_bytes;
                        format!(
                            "{FILE_NAME} had no valid header ({len} bytes); moved aside to {} and started a new stream",
                            aside.display()
                        )
                    });
                }
            }
        }
        let mut spool = match found {
            Some((file, header, scan)) => {
                let mut spool = Spool {
                    dir: dir.to_path_buf(),
                    path,
                    file,
                    _lock: lock,
                    max_bytes,
                    header,
                    acked: header.base_seq - 1,
                    file_len: scan.valid_len,
                    index: scan.frames.into(),
                };
                recovery.corrupt_frames = scan.corrupt_frames;
                recovery.corrupt_bytes = scan.corrupt_bytes;
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
                if keep_from > 0 || scan.corrupt_bytes > 0 {
                    let mut h = spool.header;
                    h.dropped = h.dropped.saturating_add(dropped);
                    h.corrupt = h.corrupt.saturating_add(scan.corrupt_frames);
                    spool.rewrite(keep_from, h)?;
                }
                spool
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
                Spool {
                    dir: dir.to_path_buf(),
                    path,
                    file,
                    _lock: lock,
                    max_bytes,
                    header,
                    index: VecDeque::new(),
                    acked: 0,
                    file_len: HEADER_LEN,
                }
            }
        };
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

/// Renames an unreadable `spool.bin` to `spool.bin.corrupt-<unix ms>` (never over an existing
/// file) and makes the rename durable.
fn move_aside(dir: &Path, path: &Path) -> Result<PathBuf, SpoolError> {
    let stamp = unix_ms();
    let mut aside = dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = dir.join(format!("{FILE_NAME}.corrupt-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(io_err(path))?;
    sync_dir(dir).map_err(io_err(dir))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1 << 20;

    fn open(dir: &Path) -> (Spool, Recovery) {
        Spool::open(dir, CAP).unwrap()
    }

    fn all(s: &Spool) -> Vec<Record> {
        s.records_from(0, usize::MAX).unwrap()
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record {i} {}", "x".repeat((i % 7) as usize)).into_bytes()
    }

    fn file(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

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

    fn spool_with(dir: &Path, n: u64) -> u64 {
        let (mut s, _) = open(dir);
        for i in 1..=n {
            s.append(1, &payload(i)).unwrap();
        }
        s.stream_id()
    }

    fn check_recovered(dir: &Path, stream: u64, good: u64, corrupt: u64) -> Spool {
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

    #[test]
    fn truncated_tail_is_cut_counted_and_appends_continue() {
        let d = tempfile::tempdir().unwrap();
        let stream = spool_with(d.path(), 5);
        let len = std::fs::metadata(file(d.path())).unwrap().len();
        let f = OpenOptions::new().write(true).open(file(d.path())).unwrap();
        f.set_len(len - 3).unwrap(); // mid-frame of seq 5
        drop(f);
        let mut s = check_recovered(d.path(), stream, 4, 1);
        assert_eq!(s.append(1, &payload(5)).unwrap(), 5);
        assert_eq!(s.append(1, &payload(6)).unwrap(), 6);
        drop(s);
        // The count was persisted with the cut: a clean reopen keeps it and finds no damage.
        let (s, r) = open(d.path());
        assert_eq!((r.records, r.corrupt_frames, s.stats().corrupt), (6, 0, 1));
        assert_eq!(
            all(&s)[5],
            Record {
                seq: 6,
                kind: 1,
                payload: payload(6)
            }
        );
    }

    #[test]
    fn flipped_byte_in_the_last_frame_is_cut_counted_and_appends_continue() {
        let d = tempfile::tempdir().unwrap();
        let stream = spool_with(d.path(), 5);
        let mut bytes = std::fs::read(file(d.path())).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        std::fs::write(file(d.path()), &bytes).unwrap();
        let mut s = check_recovered(d.path(), stream, 4, 1);
        assert_eq!(s.append(1, b"after").unwrap(), 5);
        drop(s);
        let (s, r) = open(d.path());
        assert_eq!((r.records, s.stats().corrupt, s.next_seq()), (5, 1, 6));
        // A second damage adds to the total.
        drop(s);
        let mut bytes = std::fs::read(file(d.path())).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(file(d.path()), &bytes).unwrap();
        let (s, r) = open(d.path());
        assert_eq!((r.records, r.corrupt_frames, s.stats().corrupt), (4, 1, 2));
    }

    #[test]
    fn damage_mid_file_loses_the_rest_and_counts_every_frame() {
        let d = tempfile::tempdir().unwrap();
        let stream = spool_with(d.path(), 6);
        let mut bytes = std::fs::read(file(d.path())).unwrap();
        let frames = scan(&bytes).frames;
        bytes[frames[2].offset as usize + 12] ^= 0xff; // seq field of frame 3
        std::fs::write(file(d.path()), &bytes).unwrap();
        check_recovered(d.path(), stream, 2, 4);
    }

    #[test]
    fn bad_header_moves_the_file_aside_and_starts_a_new_stream() {
        let d = tempfile::tempdir().unwrap();
        let old = spool_with(d.path(), 3);
        let mut bytes = std::fs::read(file(d.path())).unwrap();
        bytes[20] ^= 1; // base_seq
        std::fs::write(file(d.path()), &bytes).unwrap();
        let (mut s, r) = open(d.path());
        assert!(r.created);
        assert_ne!(r.stream_id, old);
        assert_eq!(
            (r.records, r.corrupt_frames, r.corrupt_bytes),
            (0, 1, bytes.len() as u64)
        );
        let note = r.note.unwrap();
        assert!(note.contains("moved aside"), "{note}");
        let aside: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("spool.bin.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::read(d.path().join(&aside[0])).unwrap(),
            bytes,
            "data kept"
        );
        assert_eq!((s.next_seq(), s.stats().corrupt), (1, 1));
        assert_eq!(s.append(0, b"fresh").unwrap(), 1);
    }

    #[test]
    fn empty_file_starts_a_new_stream_with_a_note() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(file(d.path()), b"").unwrap();
        let (s, r) = open(d.path());
        assert!(r.created && r.note.is_some());
        assert_eq!((r.corrupt_frames, s.next_seq()), (0, 1));
    }

    #[test]
    fn leftover_temp_file_is_ignored_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let stream = spool_with(d.path(), 2);
        std::fs::write(d.path().join(TMP_NAME), b"half a compaction").unwrap();
        let (s, r) = open(d.path());
        assert_eq!((r.stream_id, r.records, r.note), (stream, 2, None));
        assert!(!d.path().join(TMP_NAME).exists());
        drop(s);
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

    #[test]
    fn scan_of_a_spool_file_and_header_roundtrip() {
        let h = Header {
            stream_id: 42,
            base_seq: 7,
            dropped: 1,
            corrupt: 2,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(Header::decode(&Header { base_seq: 0, ..h }.encode()), None);
        let mut img = h.encode().to_vec();
        img.extend(encode_frame(7, 1, b"a"));
        img.extend(encode_frame(8, 2, b""));
        let s = scan(&img);
        assert_eq!(s.header, Some(h));
        assert_eq!(
            s.frames.iter().map(|f| (f.seq, f.kind)).collect::<Vec<_>>(),
            vec![(7, 1), (8, 2)]
        );
        assert_eq!(
            (s.valid_len, s.corrupt_bytes, s.corrupt_frames),
            (img.len() as u64, 0, 0)
        );
        assert_eq!(s.next_seq(), Some(9));
        // A frame out of sequence stops the scan.
        img.extend(encode_frame(10, 0, b"gap"));
        let s = scan(&img);
        assert_eq!((s.frames.len(), s.corrupt_frames), (2, 1));
        assert_eq!(scan(b"short").header, None);
    }
}

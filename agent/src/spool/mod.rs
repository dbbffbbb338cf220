//! The on-disk store-and-forward spool: telemetry reports, calibration reports and config acks
//! wait here until the relay acknowledges them end to end (see [`crate::forward`]).
//!
//! # Guarantees
//!
//! - **Durable once numbered**: a seq returned by [`Spool::append`] is on disk (fsynced); a
//!   record leaves the file only once acknowledged, or dropped at the cap (and counted).
//! - **Ordered, gap-free seqs**: frames hold contiguous seqs, increasing across restarts and
//!   compactions for as long as the stream (`stream_id`) lives.
//! - **Bounded**: the file never exceeds `max_bytes`; when full, the *oldest* records go first.
//! - **Crash-safe rewrites**: `spool.bin` is only ever replaced whole (temp file, fsync, rename,
//!   directory fsync), so a crash leaves the old file or the new one, never a mix.
//! - **Self-checking**: every header and frame carries a CRC32; damage found at open is cut off
//!   and counted, never parsed as data, and an unreadable file is moved aside, not deleted.
//! - **One writer**: an advisory lock keeps a second agent off the same directory.
//!
//! Not guaranteed: acknowledgements survive a crash (they are in memory; the relay
//! de-duplicates what is sent again), and seqs of complete frames destroyed by damage are not
//! reused (see "Recovery at open").
//!
//! # Code map
//!
//! - `format.rs`: the header and frame encodings, their CRCs, and the frame parser.
//! - `recovery.rs`: [`scan`] of a file image, and what [`Spool::open`] does with the file it finds
//!   (cut a damaged tail, move an unreadable file aside).
//! - `file.rs`: the [`Spool`] (lock, append + fsync, ack and compaction, cap, atomic rewrite).
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

mod file;
mod format;
mod recovery;
#[cfg(test)]
mod test_support;

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use file::{Record, Spool, SpoolStats};
pub use format::{
    encode_frame, FrameIndex, Header, FRAME_OVERHEAD, HEADER_LEN, MAGIC, MAX_BASE_SEQ, MAX_PAYLOAD,
};
pub use recovery::{scan, Recovery, Scan};

/// The spool file in the spool directory.
pub const FILE_NAME: &str = "spool.bin";
/// Holder of the spool's advisory lock (see the module docs for why it is a separate file).
pub const LOCK_NAME: &str = "spool.lock";
/// Scratch file of a rewrite.
pub const TMP_NAME: &str = "spool.bin.tmp";
/// Smallest cap accepted: a few reports plus the header.
pub const MIN_MAX_BYTES: u64 = 4096;

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

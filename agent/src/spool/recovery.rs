//! What [`Spool::open`](super::Spool::open) does with the file it finds: [`scan`] it for the
//! valid prefix, and count the damaged tail after it (torn write, checksum failure, seq out of
//! order, implausible length) so the caller can cut it off in one atomic rewrite; or, when the
//! header itself is unreadable, move the whole file aside for a human. Recovery never deletes
//! data it cannot account for.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::file::{read_at, sync_dir};
use super::format::{
    frame_body_len, read_frame, FrameIndex, Header, SliceSource, Source, FRAME_PREFIX, HEADER_LEN,
};
use super::{io_err, SpoolError, FILE_NAME};

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

pub(super) fn scan_source<S: Source>(src: &mut S) -> Result<Scan, S::Error> {
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

/// Looks at an existing `spool.bin`: returns it with its header and scan when the header is
/// valid. Otherwise the file is dropped, and, unless it was empty, moved aside and counted in
/// `recovery` as corrupt; either way `recovery.note` says a new stream must be started.
pub(super) fn examine(
    dir: &Path,
    path: &Path,
    file: File,
    recovery: &mut Recovery,
) -> Result<Option<(File, Header, Scan)>, SpoolError> {
    let len = file.metadata().map_err(io_err(path))?.len();
    let scan = scan_source(&mut FileSource { file: &file, len }).map_err(io_err(path))?;
    match scan.header {
        Some(header) => Ok(Some((file, header, scan))),
        None => {
            drop(file);
            recovery.note = Some(if len == 0 {
                format!("{FILE_NAME} was empty; started a new stream")
            } else {
                let aside = move_aside(dir, path)?;
                // At least one record was lost; how many cannot be known, so it
                // counts as one frame, as `scan` says.
                recovery.corrupt_frames = scan.corrupt_frames;
                recovery.corrupt_bytes = scan.corrupt_bytes;
                format!(
                    "{FILE_NAME} had no valid header ({len} bytes); moved aside to {} and started a new stream",
                    aside.display()
                )
            });
            Ok(None)
        }
    }
}

/// Renames an unreadable `spool.bin` to `spool.bin.corrupt-<unix ms>` (never over an existing
/// file) and makes the rename durable.
fn move_aside(dir: &Path, path: &Path) -> Result<PathBuf, SpoolError> {
    let stamp = tierd_runtime::unix_ms();
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
    use std::fs::OpenOptions;

    use super::super::test_support::*;
    use super::super::*;

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

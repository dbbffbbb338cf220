//! The byte layout of `spool.bin`: the header, one frame, and the checksums that make either
//! trustworthy (see the [module docs](super) for the table). Pure code, no I/O: a frame is parsed
//! through a [`Source`], so the same parser reads a slice (tests, fuzzing) or the file itself.

use std::convert::Infallible;

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
pub(super) const FRAME_PREFIX: u64 = 8;
/// Bytes covered by the crc besides the payload (seq, kind).
pub(super) const BODY_FIXED: u32 = 9;
pub(super) const MAX_BODY: u32 = BODY_FIXED + MAX_PAYLOAD as u32;

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

/// Random access to the bytes being scanned: a slice (tests, fuzzing) or the file itself
/// (recovery, so a large spool is not read into memory at once).
pub(super) trait Source {
    type Error;
    fn total_len(&self) -> u64;
    /// Fills `buf` from `pos`; the scanner only asks for ranges within `total_len`.
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

pub(super) struct SliceSource<'a>(pub(super) &'a [u8]);

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

/// A frame's `len` field if the frame it announces is plausible and fits before `total`.
pub(super) fn frame_body_len<S: Source>(
    src: &mut S,
    pos: u64,
    total: u64,
) -> Result<Option<u32>, S::Error> {
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
pub(super) fn read_frame<S: Source>(
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

//! Helpers of the property tests (`*/tests/fuzz_*.rs`). Std only: the fuzz suites of
//! `edge-agent`, `cloud-relay` and `tierd-protocol` include this file with `#[path]`, since this
//! crate depends on (some of) them.
#![allow(dead_code)] // Each including suite uses what it needs.

/// Cases per property: `PROPTEST_CASES` if set and valid, else 100,000.
pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Replaces `len` bytes at `at` with `with` (a splice mutation, as coverage fuzzers do); `at`
/// and `len` are clamped to `base`.
pub fn splice(base: &[u8], at: usize, len: usize, with: &[u8]) -> Vec<u8> {
    let at = at.min(base.len());
    let end = (at + len).min(base.len());
    let mut out = base[..at].to_vec();
    out.extend_from_slice(with);
    out.extend_from_slice(&base[end..]);
    out
}

//! `tierd-devkit`: the few helpers the demo, the bench, the replay and the end-to-end tests all
//! need, in one place instead of a copy each.
//!
//! - [`paths`]: files of the workspace ([`repo_path`]), wherever the tool runs from.
//! - [`net`]: a free TCP port on 127.0.0.1 ([`free_port`]) and whether one accepts
//!   ([`port_accepts`]).
//! - [`inproc`]: a relay (with its embedded broker) and agents started in this process, on free
//!   ports, with the configuration the demo and the bench share, and stopped cleanly.
//! - [`release`]: a committed model renamed and signed, as an operator ships it in a rollout.
//! - [`fuzz`]: the property tests' case count and splice mutation. It depends on std only, so the
//!   fuzz suites of crates this one depends on include the file itself (`#[path]`) instead of
//!   depending on this crate.
//!
//! Nothing here is used by the daemons: it is development tooling, kept small.

pub mod fuzz;
pub mod inproc;
pub mod net;
pub mod paths;
pub mod release;

pub use net::{free_port, port_accepts};
pub use paths::{breast_stream, repo_path, repo_root, CLOUD_MANIFEST, EDGE_MANIFEST};

#[cfg(test)]
mod tests {
    // Here rather than in `fuzz.rs`, which the fuzz suites include: they need not run it.
    use crate::fuzz::splice;

    #[test]
    fn splice_replaces_and_clamps() {
        assert_eq!(splice(b"abcdef", 1, 2, b"XY"), b"aXYdef");
        assert_eq!(splice(b"abc", 1, 0, b"-"), b"a-bc");
        assert_eq!(splice(b"abc", 2, 99, b""), b"ab");
        assert_eq!(splice(b"abc", 99, 5, b"!"), b"abc!");
    }
}

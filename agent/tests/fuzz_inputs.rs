//! Property tests of the agent's parsers of outside input: the HTTP infer body (JSON and the
//! binary tensor extension) and `agent.toml`. They must never panic, and whatever they accept
//! must satisfy the checks the rest of the agent relies on. 100,000 cases per property by
//! default (`PROPTEST_CASES` overrides).

use edge_agent::config::AgentConfig;
use edge_agent::oip;
use proptest::prelude::*;

// Shared with the other crates' fuzz suites (std only, so included rather than depended on).
#[path = "../../devkit/src/fuzz.rs"]
mod fuzz;
use fuzz::{cases, splice};

const EXAMPLE: &str = include_str!("../../cross/agent.example.toml");

const BODY: &str = r#"{"id":"7","inputs":[{"name":"input","shape":[1,64],"datatype":"UINT8","data":[0,0,80,240,240,80,0,0,0,0,240,80,80,240,0,0,0,0,0,0,80,240,0,0,0,0,0,80,240,80,0,0,0,0,80,240,80,0,0,0,0,80,240,80,0,0,0,0,0,240,240,240,240,240,0,0,0,0,0,0,0,0,0,0]}]}"#;

fn check_body(body: &[u8], header_len: Option<usize>) -> Result<(), TestCaseError> {
    if let Ok((req, binary)) = oip::parse_request(body, header_len) {
        // An accepted request yields a tensor whose element count matches its shape, or an
        // error message, never a panic.
        if let Ok(t) = oip::input_tensor(&req, binary, "input") {
            prop_assert!(t.validate().is_ok(), "accepted an invalid tensor: {t:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn infer_body_mutations_never_panic(
        at in 0usize..400,
        len in 0usize..20,
        with in prop::collection::vec(any::<u8>(), 0..20),
        header in prop::option::of(0usize..500),
    ) {
        let body = splice(BODY.as_bytes(), at, len, &with);
        check_body(&body, header)?;
    }

    #[test]
    fn arbitrary_bodies_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..512),
        header in prop::option::of(0usize..600),
    ) {
        check_body(&body, header)?;
    }

    #[test]
    fn config_mutations_never_panic_and_accepted_ones_validate(
        at in 0usize..4000,
        len in 0usize..12,
        with in "[ -~\n]{0,12}",
    ) {
        let text = String::from_utf8_lossy(&splice(EXAMPLE.as_bytes(), at, len, with.as_bytes())).to_string();
        if let Ok(cfg) = AgentConfig::parse(&text) {
            prop_assert!(cfg.validate().is_ok());
        }
    }
}

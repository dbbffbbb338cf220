//! Property tests of the relay's parsers of outside input: `relay.toml`, and the operators'
//! `key=value` overrides (CLI and HTTP). They must never panic, and whatever they accept must
//! pass the checks the rest of the relay relies on. 100,000 cases per property by default
//! (`PROPTEST_CASES` overrides).

use cloud_relay::config::RelayConfig;
use proptest::prelude::*;
use tierd_protocol::Settings;

// Shared with the other crates' fuzz suites (std only, so included rather than depended on).
#[path = "../../devkit/src/fuzz.rs"]
mod fuzz;
use fuzz::{cases, splice};

const EXAMPLE: &str = include_str!("../../cross/relay.example.toml");

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn relay_toml_mutations_never_panic_and_accepted_ones_validate(
        at in 0usize..5000,
        len in 0usize..12,
        with in "[ -~\n]{0,12}",
    ) {
        let text = String::from_utf8_lossy(&splice(EXAMPLE.as_bytes(), at, len, with.as_bytes())).to_string();
        if let Ok(cfg) = RelayConfig::parse(&text) {
            prop_assert!(cfg.validate().is_ok());
            let setup = cfg.tuner_setup();
            prop_assert!(setup.limits.min_threshold <= setup.limits.max_threshold);
        }
    }

    #[test]
    fn operator_settings_never_panic_and_stay_in_range(
        key in prop_oneof![
            Just("threshold".to_string()),
            Just("signal".to_string()),
            Just("audit_rate".to_string()),
            Just("escalation_timeout_ms".to_string()),
            Just("telemetry_interval_s".to_string()),
            "[a-z_]{0,24}",
        ],
        value in prop_oneof!["[ -~]{0,16}", "-?[0-9]{0,4}(\\.[0-9]{0,4})?(e-?[0-9]{1,3})?"],
    ) {
        let mut s = Settings::default();
        let before = s.clone();
        match s.set(&key, &value) {
            Ok(()) => prop_assert!(s.validate().is_ok(), "{key}={value} accepted: {s:?}"),
            Err(_) => prop_assert_eq!(s, before),
        }
    }
}

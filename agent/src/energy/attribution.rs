//! Attribution: which share of a window's joules is this agent's, per inference and per
//! escalation. Pure arithmetic, so the method is testable and documented in one place.
//!
//! **Compute.** A meter measures a whole domain: the board (INA219, INA3221 `VDD_IN`), the CPU
//! package (RAPL), or, for the estimate, this process alone. For a whole-domain meter the agent
//! is charged in proportion to the CPU capacity it used:
//! `attributed = window_joules × agent_cpu_s / (window_s × cores)`, capped at the window's
//! joules. This charges the agent its share of idle power too, which is what an operator
//! paying for the board wants; it over-states the marginal cost on a mostly idle board and
//! is exact for the estimate, which is already process-only (`attributed = window_joules`).
//! Per inference: `attributed / answered requests` (HTTP parsing included: it is part of
//! answering locally).
//!
//! **Radio.** Nothing on the board meters the radio separately, so it is modelled:
//! `joules = messages × joules_per_message + payload bytes × joules_per_byte` for the
//! escalation request and reply, with per-link coefficients ([`LinkModel`]). An escalation costs
//! the local inference that preceded it plus its radio joules; the cloud's own compute is the
//! relay's bill, not the device's.

use serde::{Deserialize, Serialize};

/// The radio link the escalations travel over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Ethernet,
    #[default]
    Wifi,
    Lte,
}

/// Radio cost coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    pub joules_per_byte: f64,
    pub joules_per_message: f64,
}

impl Link {
    /// Coefficients per link. Sources (see docs/energy in the README):
    /// - Wi-Fi: 6.45e-7 J/bit measured on 802.11b/g phones (AAU) = 5.2e-6 J/byte; a per-frame
    ///   overhead independent of size exists (Serrano et al.) — 1 mJ per message is [U].
    /// - LTE: HSDPA 1.13e-5 J/bit = 9.0e-5 J/byte (AAU); the tail after the last packet dominates
    ///   (Huang et al., MobiSys 2012: ~10 s timer). 0.5 J per message assumes escalations share
    ///   tails and is [U]: measure it on your modem and set `joules_per_message`.
    /// - Ethernet: [U] order of magnitude of a PHY's energy per byte; negligible next to compute.
    pub fn model(self) -> LinkModel {
        match self {
            Link::Ethernet => LinkModel {
                joules_per_byte: 1.0e-8,
                joules_per_message: 0.0,
            },
            Link::Wifi => LinkModel {
                joules_per_byte: 5.2e-6,
                joules_per_message: 1.0e-3,
            },
            Link::Lte => LinkModel {
                joules_per_byte: 9.0e-5,
                joules_per_message: 0.5,
            },
        }
    }
}

impl LinkModel {
    pub fn joules(&self, messages: u64, bytes: u64) -> f64 {
        messages as f64 * self.joules_per_message + bytes as f64 * self.joules_per_byte
    }
}

/// What happened in one window, as far as energy is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowUsage {
    /// Joules the meter saw in the window; `None` if it could not be read.
    pub window_joules: Option<f64>,
    /// True for a process-only meter (the estimate): no sharing needed.
    pub process_only: bool,
    pub window_seconds: f64,
    pub agent_cpu_seconds: f64,
    pub cores: u32,
    pub answered: u64,
    pub escalations: u64,
    /// MQTT messages and payload bytes for escalations (both directions).
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attribution {
    pub attributed_joules: Option<f64>,
    pub joules_per_inference: Option<f64>,
    pub radio_joules: f64,
    pub radio_joules_per_escalation: Option<f64>,
}

pub fn attribute(u: &WindowUsage, link: &LinkModel) -> Attribution {
    let attributed = u.window_joules.map(|j| {
        let j = j.max(0.0);
        if u.process_only {
            j
        } else if u.window_seconds > 0.0 && u.cores > 0 {
            let share = u.agent_cpu_seconds / (u.window_seconds * f64::from(u.cores));
            j * share.clamp(0.0, 1.0)
        } else {
            0.0
        }
    });
    let radio = link.joules(u.messages, u.bytes);
    Attribution {
        attributed_joules: attributed,
        joules_per_inference: attributed
            .filter(|_| u.answered > 0)
            .map(|a| a / u.answered as f64),
        radio_joules: radio,
        radio_joules_per_escalation: (u.escalations > 0).then(|| radio / u.escalations as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> WindowUsage {
        WindowUsage {
            window_joules: Some(120.0),
            process_only: false,
            window_seconds: 30.0,
            agent_cpu_seconds: 6.0,
            cores: 4,
            answered: 1000,
            escalations: 100,
            messages: 200,
            bytes: 100 * (96 + 70),
        }
    }

    #[test]
    fn whole_board_meter_is_shared_by_cpu_capacity_used() {
        // 6 CPU-s of 120 available = 5 % of 120 J = 6 J, over 1000 answers.
        let a = attribute(&usage(), &Link::Wifi.model());
        assert!((a.attributed_joules.unwrap() - 6.0).abs() < 1e-9);
        assert!((a.joules_per_inference.unwrap() - 0.006).abs() < 1e-12);
    }

    #[test]
    fn process_only_meter_is_taken_whole() {
        let u = WindowUsage {
            process_only: true,
            window_joules: Some(2.0),
            ..usage()
        };
        let a = attribute(&u, &Link::Wifi.model());
        assert_eq!(a.attributed_joules, Some(2.0));
    }

    #[test]
    fn radio_joules_follow_bytes_and_messages() {
        let a = attribute(&usage(), &Link::Wifi.model());
        let expected = 200.0 * 1.0e-3 + 16_600.0 * 5.2e-6;
        assert!((a.radio_joules - expected).abs() < 1e-12);
        assert!((a.radio_joules_per_escalation.unwrap() - expected / 100.0).abs() < 1e-12);
        let lte = attribute(&usage(), &Link::Lte.model());
        assert!(lte.radio_joules > 100.0 * a.radio_joules);
    }

    #[test]
    fn idle_or_unmetered_windows_give_none_not_zero() {
        let idle = WindowUsage {
            answered: 0,
            escalations: 0,
            messages: 0,
            bytes: 0,
            ..usage()
        };
        let a = attribute(&idle, &Link::Wifi.model());
        assert_eq!(a.joules_per_inference, None);
        assert_eq!(a.radio_joules_per_escalation, None);
        let unmetered = WindowUsage {
            window_joules: None,
            ..usage()
        };
        let a = attribute(&unmetered, &Link::Wifi.model());
        assert_eq!(a.attributed_joules, None);
        assert_eq!(a.joules_per_inference, None);
    }

    #[test]
    fn share_is_capped_and_never_negative() {
        let busy = WindowUsage {
            agent_cpu_seconds: 1000.0,
            ..usage()
        };
        assert_eq!(
            attribute(&busy, &Link::Ethernet.model()).attributed_joules,
            Some(120.0)
        );
        let weird = WindowUsage {
            window_joules: Some(-1.0),
            ..usage()
        };
        assert_eq!(
            attribute(&weird, &Link::Ethernet.model()).attributed_joules,
            Some(0.0)
        );
    }
}

//! **The cost report**: what tierd saved, in money, device energy and CO₂, against sending
//! everything to the cloud and against answering everything on the device. Pure: usage and
//! prices in, numbers and a text table out. [`usage`] maps a device's fleet record into
//! [`DeviceUsage`]; the caller serves the result (`cloud-relay report`, `GET /api/report`).
//!
//! # The model: the same traffic, three ways
//! Every device's answered requests are replayed, on paper, through three deployments:
//!
//! - **tierd** (measured): what happened. Cloud calls are the escalations plus the background
//!   audits (an audit is a cloud call like any other; the cloud bills it the same). Escalations
//!   are counted as *attempted*, not answered: one that timed out at the device has usually
//!   still reached the relay and been computed, so the cloud bill is an upper bound rather
//!   than a flattering undercount. Device energy is the meter's total attributed to tierd
//!   (compute + modelled radio). Without a meter total it is rebuilt from the per-request
//!   figures (`requests × joules_per_inference + escalations × radio_joules_per_escalation`)
//!   and a note says so.
//! - **all-cloud**: every request is a cloud call and the device runs no model, so its only
//!   energy is the radio: `requests × radio joules per cloud call`. There are no audits (nothing
//!   is answered locally, so there is nothing to audit) and no disagreements, because the cloud
//!   model is the reference every agreement figure is measured against.
//! - **all-edge**: no cloud calls and no audits; every request costs one local inference,
//!   `requests × joules_per_inference`, and disagrees with the cloud at the rate the tuner
//!   estimates for threshold 0 (`edge_only_agreement`).
//!
//! Money is `kWh × energy_per_kwh + calls/1000 × cloud_per_1000_calls + disagreements ×
//! per_disagreement`; CO₂ is `kWh × grid_g_co2_per_kwh + calls/1000 × cloud_g_co2_per_1000_calls`.
//! A saving is `(baseline − tierd) / baseline × 100`: negative when tierd costs more, and it
//! is reported as such, never clamped — against all-edge tierd normally spends more energy and
//! money unless accuracy is priced, because every escalation *adds* radio and a cloud call to
//! a local inference that already ran. That is the honest trade: `per_disagreement` is the
//! knob that lets the accuracy bought show up in money. The fleet is the sum of the devices'
//! scenarios, so its savings weigh each device by its traffic.
//!
//! # When a relative figure is given
//! A percentage is only as meaningful as its baseline: against an all-edge bill of a few
//! millionths of a euro, tierd's cloud calls read as `-198285 %`, which says nothing a reader
//! can use. So a saving is given only when the baseline is **non-zero and at least 1 %
//! ([`MIN_BASELINE_SHARE`]) of the larger of the two figures** (baseline and tierd). Every
//! saving shown therefore lies in [−9,900 %, +100 %]: at worst "tierd costs 100× the
//! baseline". Otherwise the saving is `None` (`null` in JSON, `-` in the table) and a note
//! gives both absolute figures and the difference in words, e.g. "all-edge costs 0 EUR: no
//! relative figure; tierd costs 0.6286 EUR more". Withholding never flatters tierd: the rule
//! only ever fires when the baseline is the *smaller* figure, i.e. when tierd costs more, and
//! then the note says by how much. A baseline far above tierd's figure always gets its
//! saving (close to +100 %), which is meaningful.
//!
//! # Assumptions, and which way each one leans
//! - Counters and the energy total cover the same period (since the agent started), and the
//!   per-request figures of the latest telemetry window (`joules_per_inference`,
//!   `radio_joules_per_escalation`, agreements) stand for that whole period.
//! - The agent's `radio_joules_per_escalation` is *all* its MQTT radio in the window (audits
//!   included) divided by the window's escalations (`agent/src/energy/attribution.rs`). So the
//!   radio of one cloud call is taken as that figure × `escalations / (escalations + audits)`;
//!   using the raw figure for all-cloud would inflate that baseline by the audit share and
//!   flatter tierd. The lifetime counters give the ratio: an approximation of the window's.
//! - An audit is a cloud call in every figure: it counts in tierd's cloud calls (the table's
//!   `cloud calls = escalations + audits`), is billed at `cloud_per_1000_calls`, emits
//!   `cloud_g_co2_per_1000_calls`, and costs the radio of one cloud call (it sends the same
//!   request an escalation would). With a meter total the audits' radio is already inside it
//!   (the agent attributes all its MQTT radio); rebuilt, tierd's radio is `(escalations +
//!   audits) × radio per cloud call`. An agent reports no radio figure for a window without
//!   escalations, so a device that only audits has its audit radio counted as 0, with a note:
//!   that understates tierd's cost (against tierd, but visible).
//! - The same radio figure also carries the agent's telemetry, status and config messages.
//!   Spread over the cloud calls they make a cloud call look slightly dearer than it is, which
//!   inflates the all-cloud baseline's energy a little (flatters tierd; the share is one small
//!   report per telemetry interval against every call's input tensor, so it is small).
//! - The local inference figure includes the HTTP handling, which an all-cloud device would
//!   still do. All-cloud energy therefore leaves it out and is slightly understated: this leans
//!   against tierd, which is the safe side for a savings claim.
//! - Only energy attributed to tierd counts; the board's idle draw is paid in all three
//!   deployments and cancels out. The cloud's own electricity is inside its price per call
//!   and its emissions factor, not in the device's joules.
//! - The tuner's agreement at the current threshold assumes escalations got the cloud's
//!   answer. Those that fell back to the local answer (`escalations − cloud_answers`) may
//!   disagree; a note gives that count as the upper bound on the extra disagreements.
//! - Accuracy is priced for a device only when both the tierd and the all-edge disagreements
//!   are known. Charging one deployment for its mistakes and not the other would make the
//!   comparison meaningless, so otherwise money leaves accuracy out of all three, and a
//!   note says so.
//! - Nothing here is silently zero: every missing figure that had to be taken as 0 comes
//!   with a note naming it and the direction of the error.

use std::fmt::Write as _;

use crate::fleet::{self, DeviceRecord};
use crate::tuner;

use serde::{Deserialize, Serialize};
use thiserror::Error;

const JOULES_PER_KWH: f64 = 3.6e6;

/// A relative figure (a saving in %) is given only when its baseline is non-zero and at least
/// this share of the larger of the two figures compared; see the module doc.
pub const MIN_BASELINE_SHARE: f64 = 0.01;

/// Prices and emission factors (relay.toml `[prices]`); every key has a documented default.
/// The defaults are orders of magnitude to start from, not facts about anyone's bill: set
/// them from your own contract and grid.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    /// Label for the money figures (1-8 characters); no conversion happens. Default `EUR`.
    pub currency: String,
    /// Electricity at the device, per kWh. Default 0.30 (a European household tariff).
    pub energy_per_kwh: f64,
    /// Cloud inference per 1,000 calls (escalations and audits alike). Default 0.40, the
    /// order of a managed endpoint's per-request price for a small vision model.
    pub cloud_per_1000_calls: f64,
    /// Grid carbon intensity at the device, g CO₂ per kWh. Default 400 (a mixed grid).
    pub grid_g_co2_per_kwh: f64,
    /// Embodied + operational emissions of the cloud per 1,000 calls, g CO₂. Default 2.0.
    pub cloud_g_co2_per_1000_calls: f64,
    /// The price of one answer that disagrees with the cloud model: the accuracy price.
    /// Default 0: accuracy is counted but costs nothing, so the report weighs only energy and
    /// cloud calls. Set it to make accuracy count in money (e.g. the cost of one wrong
    /// decision downstream).
    pub per_disagreement: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            currency: "EUR".into(),
            energy_per_kwh: 0.30,
            cloud_per_1000_calls: 0.40,
            grid_g_co2_per_kwh: 400.0,
            cloud_g_co2_per_1000_calls: 2.0,
            per_disagreement: 0.0,
        }
    }
}

/// Why `[prices]` is refused; the message names the key as `prices.<key>`.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum PricesError {
    #[error("prices.currency {0:?} must be 1-8 characters without spaces")]
    Currency(String),
    #[error("prices.{key} = {value} must be a finite number >= 0")]
    Negative { key: &'static str, value: f64 },
}

impl Prices {
    /// Every figure finite and non-negative, the currency 1-8 printable characters. The
    /// message names the offending key as `prices.<key>`.
    pub fn validate(&self) -> Result<(), PricesError> {
        let n = self.currency.chars().count();
        if !(1..=8).contains(&n) || self.currency.chars().any(|c| c.is_control() || c == ' ') {
            return Err(PricesError::Currency(self.currency.clone()));
        }
        for (key, v) in [
            ("energy_per_kwh", self.energy_per_kwh),
            ("cloud_per_1000_calls", self.cloud_per_1000_calls),
            ("grid_g_co2_per_kwh", self.grid_g_co2_per_kwh),
            (
                "cloud_g_co2_per_1000_calls",
                self.cloud_g_co2_per_1000_calls,
            ),
            ("per_disagreement", self.per_disagreement),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PricesError::Negative { key, value: v });
            }
        }
        Ok(())
    }
}

/// What one device did, from its telemetry (the caller maps the fleet records into this).
/// Counters and `energy_joules` cover the same period (since the agent started).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceUsage {
    pub device_id: String,
    /// Answered requests (edge + cloud + edge_fallback).
    pub requests: u64,
    /// Escalations attempted: cloud + edge_fallback.
    pub escalations: u64,
    /// Escalations the cloud answered.
    pub cloud_answers: u64,
    /// Background audit calls to the cloud (they are cloud calls too).
    pub audits: u64,
    /// Device joules attributed to tierd since start (compute + modelled radio); `None` = no
    /// meter.
    pub energy_joules: Option<f64>,
    /// True when the energy came from the CPU-time estimate, not a meter.
    pub energy_estimated: bool,
    /// Local compute per inference (latest window).
    pub joules_per_inference: Option<f64>,
    /// Modelled radio per escalation as the agent reports it: the window's escalation *and
    /// audit* MQTT radio divided by its escalations.
    pub radio_joules_per_escalation: Option<f64>,
    /// Estimated agreement with the cloud at the device's current threshold (from the tuner).
    pub agreement: Option<f64>,
    /// Estimated agreement if everything were answered locally (threshold 0).
    pub edge_only_agreement: Option<f64>,
}

/// One deployment's bill for a device's traffic (or the fleet's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub cloud_calls: f64,
    /// Device energy, joules.
    pub energy_joules: f64,
    /// Answers expected to disagree with the cloud model; `None` when unknown.
    pub disagreements: Option<f64>,
    pub money: f64,
    pub g_co2: f64,
}

/// tierd against its two baselines. A saving is negative when tierd costs more, and `None`
/// when the baseline is 0 or under [`MIN_BASELINE_SHARE`] of the larger figure (no meaningful
/// relative figure; the report's notes then give the absolute figures in words).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub tierd: Scenario,
    pub all_cloud: Scenario,
    pub all_edge: Scenario,
    pub money_saving_vs_all_cloud_pct: Option<f64>,
    pub money_saving_vs_all_edge_pct: Option<f64>,
    pub co2_saving_vs_all_cloud_pct: Option<f64>,
    pub co2_saving_vs_all_edge_pct: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    pub usage: DeviceUsage,
    pub comparison: Comparison,
    /// Every assumption this device's figures needed beyond the model (missing meter,
    /// unknown agreement, fallbacks, inconsistent counters, tierd costing more).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub prices: Prices,
    pub devices: Vec<DeviceReport>,
    /// Sums of the devices' scenarios.
    pub fleet: Comparison,
    pub fleet_requests: u64,
    pub fleet_escalations: u64,
    /// Cloud calls tierd made: escalations + audits.
    pub fleet_cloud_calls: u64,
    pub notes: Vec<String>,
}

/// The report for these devices at these prices. Expects prices that pass
/// [`Prices::validate`]; invalid ones are reported in `notes` rather than refused, because a
/// report is read by a person who should see both the numbers and the problem.
/// What a device did, for the cost report: its latest counters and energy, and the tuner's
/// agreement estimates (bounds at error rate `delta`) at its threshold and at 0 (all-edge).
pub fn usage(d: &DeviceRecord, delta: f64) -> DeviceUsage {
    let r = &d.latest;
    let (agreement, edge_only) = match &d.calibration {
        Some(c) if c.bins.iter().any(|b| b.escalated_labelled + b.audited > 0) => {
            let bins = fleet::tuner_bins(&c.edges, &c.bins);
            (
                Some(tuner::estimate_agreement(&bins, &c.cuts, r.threshold, delta).0),
                Some(tuner::estimate_agreement(&bins, &c.cuts, 0.0, delta).0),
            )
        }
        _ => (None, None),
    };
    DeviceUsage {
        device_id: d.device_id.clone(),
        requests: r.totals.answered(),
        escalations: r.totals.escalated(),
        cloud_answers: r.totals.cloud,
        audits: r.totals.audits,
        energy_joules: r.energy.attributed_joules.map(|_| r.energy.total_joules),
        energy_estimated: r.energy.estimated,
        joules_per_inference: d.energy_rates.joules_per_inference,
        radio_joules_per_escalation: d.energy_rates.radio_joules_per_escalation,
        agreement,
        edge_only_agreement: edge_only,
    }
}

pub fn build(devices: &[DeviceUsage], prices: &Prices) -> Report {
    let devices: Vec<DeviceReport> = devices.iter().map(|u| device(u, prices)).collect();

    let sum = |pick: fn(&Comparison) -> &Scenario| -> Scenario {
        let mut s = Scenario {
            cloud_calls: 0.0,
            energy_joules: 0.0,
            disagreements: Some(0.0),
            money: 0.0,
            g_co2: 0.0,
        };
        for d in &devices {
            let x = pick(&d.comparison);
            s.cloud_calls += x.cloud_calls;
            s.energy_joules += x.energy_joules;
            // A fleet total over only some devices would read as the whole fleet's.
            s.disagreements = s.disagreements.zip(x.disagreements).map(|(a, b)| a + b);
            s.money += x.money;
            s.g_co2 += x.g_co2;
        }
        s
    };
    let fleet = compare(
        sum(|c| &c.tierd),
        sum(|c| &c.all_cloud),
        sum(|c| &c.all_edge),
    );

    let mut notes = Vec::new();
    if let Err(e) = prices.validate() {
        notes.push(format!("invalid prices, figures are not meaningful: {e}"));
    }
    if devices.is_empty() {
        notes.push("no devices have reported telemetry yet".into());
    }
    if prices.per_disagreement == 0.0 {
        notes.push(
            "accuracy is not priced (prices.per_disagreement = 0): disagreements are counted \
             but cost nothing; set it to make accuracy count in money"
                .into(),
        );
    }
    let estimated = devices.iter().filter(|d| d.usage.energy_estimated).count();
    if estimated > 0 {
        notes.push(format!(
            "{estimated} of {} devices have estimated energy (CPU time × a board coefficient), \
             not metered",
            devices.len()
        ));
    }
    let unknown = devices
        .iter()
        .filter(|d| {
            d.comparison.tierd.disagreements.is_none()
                || d.comparison.all_edge.disagreements.is_none()
        })
        .count();
    if unknown > 0 {
        notes.push(format!(
            "{unknown} of {} devices have no agreement estimate: fleet disagreements are \
             unknown and accuracy is priced only where it is known",
            devices.len()
        ));
    }
    push_comparison_notes(&mut notes, "fleet", &fleet, &prices.currency);

    let total = |f: fn(&DeviceUsage) -> u64| {
        devices
            .iter()
            .fold(0u64, |acc, d| acc.saturating_add(f(&d.usage)))
    };
    Report {
        prices: prices.clone(),
        fleet_requests: total(|u| u.requests),
        fleet_escalations: total(|u| u.escalations),
        fleet_cloud_calls: total(|u| u.escalations.saturating_add(u.audits)),
        devices,
        fleet,
        notes,
    }
}

/// A per-request figure from telemetry, or `None` with a note if it cannot be one. Garbage
/// (NaN, negative) is dropped rather than propagated so one bad report cannot turn the
/// fleet's totals into NaN.
fn sane(v: Option<f64>, name: &str, max: f64, notes: &mut Vec<String>) -> Option<f64> {
    match v {
        Some(x) if x.is_finite() && (0.0..=max).contains(&x) => Some(x),
        Some(x) => {
            notes.push(format!("ignored {name} = {x}: out of range"));
            None
        }
        None => None,
    }
}

fn device(u: &DeviceUsage, p: &Prices) -> DeviceReport {
    let mut notes = Vec::new();
    let requests = u.requests as f64;
    let escalations = u.escalations as f64;
    let audits = u.audits as f64;

    if u.requests == 0 {
        notes.push("no answered requests yet: every figure is 0".into());
    }
    if u.escalations > u.requests {
        notes.push(format!(
            "inconsistent telemetry: {} escalations > {} requests",
            u.escalations, u.requests
        ));
    }
    if u.cloud_answers > u.escalations {
        notes.push(format!(
            "inconsistent telemetry: {} cloud answers > {} escalations",
            u.cloud_answers, u.escalations
        ));
    }

    let energy_total = sane(u.energy_joules, "energy_joules", f64::INFINITY, &mut notes);
    let jpi = sane(
        u.joules_per_inference,
        "joules_per_inference",
        f64::INFINITY,
        &mut notes,
    );
    let radio_per_escalation = sane(
        u.radio_joules_per_escalation,
        "radio_joules_per_escalation",
        f64::INFINITY,
        &mut notes,
    );
    let agreement = sane(u.agreement, "agreement", 1.0, &mut notes);
    let edge_only_agreement = sane(
        u.edge_only_agreement,
        "edge_only_agreement",
        1.0,
        &mut notes,
    );

    // The agent spreads audit radio over escalations; undo that for one plain cloud call.
    let radio_per_call = radio_per_escalation.map(|r| {
        if u.escalations > 0 {
            r * escalations / (escalations + audits)
        } else {
            r
        }
    });

    let tierd_energy = match (energy_total, jpi, radio_per_call) {
        (Some(j), _, _) => j,
        (None, None, None) => {
            if u.requests > 0 {
                notes.push(
                    "no energy figures at all (no meter, no per-request figures): tierd energy \
                     counted as 0, which understates its cost"
                        .into(),
                );
            }
            0.0
        }
        (None, jpi, radio) => {
            let compute = jpi.map_or(0.0, |j| requests * j);
            // Every cloud call, escalation or audit, costs one call's radio. (With escalations
            // this equals escalations × the agent's radio_joules_per_escalation, which already
            // spreads the audits' radio over the escalations.) The agent reports no radio
            // figure for a window without escalations; with no cloud call since start there
            // is no radio to miss.
            let radio_missing = radio.is_none() && (u.escalations > 0 || u.audits > 0);
            let radio = radio.map_or(0.0, |r| (escalations + audits) * r);
            let mut note = String::from(
                "no meter total: tierd energy rebuilt as requests × joules_per_inference + \
                 (escalations + audits) × radio per cloud call",
            );
            if jpi.is_none() && u.requests > 0 {
                note.push_str(" (joules_per_inference unknown: compute counted as 0)");
            }
            if radio_missing {
                note.push_str(" (radio_joules_per_escalation unknown: radio counted as 0)");
            }
            notes.push(note);
            compute + radio
        }
    };

    let all_cloud_energy = match radio_per_call {
        Some(r) => requests * r,
        None => {
            if u.requests > 0 {
                notes.push(
                    "radio per cloud call unknown (no escalation in the latest window): \
                     all-cloud device energy counted as 0, which understates that baseline"
                        .into(),
                );
            }
            0.0
        }
    };
    let all_edge_energy = match jpi {
        Some(j) => requests * j,
        None => {
            if u.requests > 0 {
                notes.push(
                    "joules_per_inference unknown: all-edge energy counted as 0, which \
                     understates that baseline"
                        .into(),
                );
            }
            0.0
        }
    };

    let tierd_disagreements = agreement.map(|a| requests * (1.0 - a));
    let edge_disagreements = edge_only_agreement.map(|a| requests * (1.0 - a));
    let priced = tierd_disagreements.is_some() && edge_disagreements.is_some();
    if !priced {
        let missing: Vec<&str> = [
            ("agreement", agreement.is_none()),
            ("edge_only_agreement", edge_only_agreement.is_none()),
        ]
        .into_iter()
        .filter_map(|(k, m)| m.then_some(k))
        .collect();
        notes.push(format!(
            "accuracy is not priced for this device: {} unknown (no tuner estimate yet); \
             money leaves disagreements out of all three scenarios so they stay comparable",
            missing.join(" and ")
        ));
    }
    let fallbacks = u.escalations.saturating_sub(u.cloud_answers);
    if fallbacks > 0 && tierd_disagreements.is_some() {
        notes.push(format!(
            "{fallbacks} escalations fell back to the local answer; the agreement estimate \
             assumes the cloud answered them, so up to {fallbacks} more disagreements"
        ));
    }

    let scenario = |calls: f64, energy: f64, disagreements: Option<f64>| {
        let kwh = energy / JOULES_PER_KWH;
        let accuracy = if priced {
            disagreements.unwrap_or(0.0) * p.per_disagreement
        } else {
            0.0
        };
        Scenario {
            cloud_calls: calls,
            energy_joules: energy,
            disagreements,
            money: kwh * p.energy_per_kwh + calls / 1000.0 * p.cloud_per_1000_calls + accuracy,
            g_co2: kwh * p.grid_g_co2_per_kwh + calls / 1000.0 * p.cloud_g_co2_per_1000_calls,
        }
    };
    let comparison = compare(
        scenario(escalations + audits, tierd_energy, tierd_disagreements),
        scenario(requests, all_cloud_energy, Some(0.0)),
        scenario(0.0, all_edge_energy, edge_disagreements),
    );
    push_comparison_notes(&mut notes, "tierd", &comparison, &p.currency);

    DeviceReport {
        usage: u.clone(),
        comparison,
        notes,
    }
}

/// `(baseline − ours) / baseline` in %, or `None` when the baseline is too small for the
/// ratio to mean anything (0, or under [`MIN_BASELINE_SHARE`] of the larger figure).
fn saving(baseline: f64, ours: f64) -> Option<f64> {
    // Relative to nothing is undefined, not 0 % or -inf; relative to almost nothing is noise.
    let meaningful = baseline > 0.0 && baseline >= MIN_BASELINE_SHARE * baseline.max(ours);
    meaningful.then(|| (baseline - ours) / baseline * 100.0)
}

fn compare(tierd: Scenario, all_cloud: Scenario, all_edge: Scenario) -> Comparison {
    Comparison {
        money_saving_vs_all_cloud_pct: saving(all_cloud.money, tierd.money),
        money_saving_vs_all_edge_pct: saving(all_edge.money, tierd.money),
        co2_saving_vs_all_cloud_pct: saving(all_cloud.g_co2, tierd.g_co2),
        co2_saving_vs_all_edge_pct: saving(all_edge.g_co2, tierd.g_co2),
        tierd,
        all_cloud,
        all_edge,
    }
}

/// Says in words what the savings columns cannot: when tierd is the dearer option (so a
/// negative figure is not mistaken for a sign convention), and, where no relative figure is
/// given, both absolute figures and the difference.
fn push_comparison_notes(notes: &mut Vec<String>, who: &str, c: &Comparison, currency: &str) {
    /// One (figure, baseline) pair of the four savings.
    struct Pair<'a> {
        base: &'a str,
        ours: f64,
        theirs: f64,
        saving: Option<f64>,
        /// "costs" or "emits", what ("" or " CO2"), the unit and the places it is shown to.
        verb: &'a str,
        what: &'a str,
        unit: &'a str,
        decimals: usize,
        /// Why tierd can be the dearer one, after the figures.
        why: &'a str,
    }
    let money = |base, theirs, saving, why| Pair {
        base,
        ours: c.tierd.money,
        theirs,
        saving,
        verb: "costs",
        what: "",
        unit: currency,
        decimals: 4,
        why,
    };
    let co2 = |base, theirs, saving| Pair {
        base,
        ours: c.tierd.g_co2,
        theirs,
        saving,
        verb: "emits",
        what: " CO2",
        unit: "g",
        decimals: 2,
        why: "",
    };
    for p in [
        money(
            "all-cloud",
            c.all_cloud.money,
            c.money_saving_vs_all_cloud_pct,
            ": local inference and audits cost more here than the cloud calls they avoid",
        ),
        money(
            "all-edge",
            c.all_edge.money,
            c.money_saving_vs_all_edge_pct,
            ": escalations and audits add radio and cloud calls to the local inference; what \
             they buy is accuracy, which counts in money only through prices.per_disagreement",
        ),
        co2(
            "all-cloud",
            c.all_cloud.g_co2,
            c.co2_saving_vs_all_cloud_pct,
        ),
        co2("all-edge", c.all_edge.g_co2, c.co2_saving_vs_all_edge_pct),
    ] {
        let Pair {
            base,
            ours,
            theirs,
            verb,
            what,
            unit,
            why,
            ..
        } = p;
        let f = |v: f64| figure(v, p.decimals);
        match p.saving {
            Some(s) if s < 0.0 => notes.push(format!(
                "{who} {verb} {:.1}% more{what} than {base} ({} vs {} {unit}){why}",
                -s,
                f(ours),
                f(theirs)
            )),
            Some(_) => {}
            // Both nothing: nothing to compare and nothing to explain.
            None if ours == 0.0 && theirs == 0.0 => {}
            None => {
                // Withheld only when the baseline is the smaller figure: tierd is the dearer.
                let baseline = if theirs == 0.0 {
                    format!("{base} {verb} 0 {unit}{what}")
                } else {
                    format!(
                        "{base} {verb} {} {unit}{what}, under {}% of {who}'s {} {unit}",
                        f(theirs),
                        MIN_BASELINE_SHARE * 100.0,
                        f(ours)
                    )
                };
                notes.push(format!(
                    "{baseline}: no relative figure; {who} {verb} {} {unit}{what} more ({} vs \
                     {} {unit}){why}",
                    f(ours - theirs),
                    f(ours),
                    f(theirs)
                ));
            }
        }
    }
}

/// `v` to `decimals` places, or, when that would print a non-zero figure as 0, to two
/// significant digits (`0.000031`), so a note never says "0.0000" of something that is not 0.
fn figure(v: f64, decimals: usize) -> String {
    let tiny = 0.5 * 10f64.powi(-(decimals as i32));
    if v == 0.0 || !v.is_finite() || v.abs() >= tiny {
        return format!("{v:.decimals$}");
    }
    // Digits after the point for two significant ones; past 12, scientific notation.
    let digits = (-v.abs().log10()).ceil() as usize + 1;
    if digits > 12 {
        format!("{v:.1e}")
    } else {
        format!("{v:.digits$}")
    }
}

/// A fixed-width text table for the CLI: one row per device and a fleet row, columns
/// requests, escalation %, cloud calls, energy J, money (tierd / all-cloud / all-edge), CO2 g,
/// savings %. Estimated energy is marked with a '*', explained under the table, followed by
/// the notes.
pub fn render_text(r: &Report) -> String {
    let p = &r.prices;
    let cur = &p.currency;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cost report: tierd vs all-cloud vs all-edge, same traffic\n\
         prices: {:.2} {cur}/kWh, {:.2} {cur} per 1,000 cloud calls, {} {cur} per \
         disagreement; {:.0} gCO2/kWh at the device, {:.1} gCO2 per 1,000 cloud calls\n",
        p.energy_per_kwh,
        p.cloud_per_1000_calls,
        p.per_disagreement,
        p.grid_g_co2_per_kwh,
        p.cloud_g_co2_per_1000_calls
    );

    // Cells first, widths second: a column is as wide as its widest cell, so a long device id,
    // currency or figure widens the table instead of breaking its alignment.
    let money_head = |s: &str| format!("{s} {cur}");
    let mut rows: Vec<[String; COLUMNS]> = vec![
        [
            "device".into(),
            "requests".into(),
            "esc %".into(),
            "cloud calls".into(),
            "energy J".into(),
            money_head("tierd"),
            money_head("all-cloud"),
            money_head("all-edge"),
            "CO2 g".into(),
            "saving vs all-cloud".into(),
            "saving vs all-edge".into(),
        ],
        [
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            "tierd".into(),
            "money / CO2".into(),
            "money / CO2".into(),
        ],
    ];
    for d in &r.devices {
        let u = &d.usage;
        rows.push(cells(
            &u.device_id,
            u.requests,
            u.escalations,
            u.escalations.saturating_add(u.audits),
            u.energy_estimated,
            &d.comparison,
        ));
    }
    let any_estimated = r.devices.iter().any(|d| d.usage.energy_estimated);
    rows.push(cells(
        "fleet",
        r.fleet_requests,
        r.fleet_escalations,
        r.fleet_cloud_calls,
        any_estimated,
        &r.fleet,
    ));
    let mut widths = [0usize; COLUMNS];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (c, &w)) in row.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(line, "{c:<w$}");
            } else {
                let _ = write!(line, "  {c:>w$}");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }

    out.push('\n');
    if any_estimated {
        out.push_str(
            "* energy estimated from CPU time × a board coefficient, not metered (the fleet \
             row includes at least one such device)\n",
        );
    }
    let _ = writeln!(
        out,
        "cloud calls = escalations + audits (audits are cloud calls in every figure); savings = \
         (baseline − tierd) / baseline, negative when tierd costs more; '-' = no relative \
         figure: the baseline is 0 or under {}% of the larger figure (the notes give both)",
        MIN_BASELINE_SHARE * 100.0
    );
    if !r.notes.is_empty() || r.devices.iter().any(|d| !d.notes.is_empty()) {
        out.push_str("\nnotes:\n");
        for n in &r.notes {
            let _ = writeln!(out, "  fleet: {n}");
        }
        for d in &r.devices {
            for n in &d.notes {
                let _ = writeln!(out, "  {}: {n}", d.usage.device_id);
            }
        }
    }
    out
}

const COLUMNS: usize = 11;

fn cells(
    name: &str,
    requests: u64,
    escalations: u64,
    calls: u64,
    estimated: bool,
    c: &Comparison,
) -> [String; COLUMNS] {
    let esc = if requests > 0 {
        format!("{:.1}", escalations as f64 / requests as f64 * 100.0)
    } else {
        "-".into()
    };
    [
        name.into(),
        requests.to_string(),
        esc,
        calls.to_string(),
        // The mark sits after the figure and unmarked figures get a space, so digits stay
        // aligned whether or not a row is estimated.
        format!(
            "{:.1}{}",
            c.tierd.energy_joules,
            if estimated { '*' } else { ' ' }
        ),
        format!("{:.4}", c.tierd.money),
        format!("{:.4}", c.all_cloud.money),
        format!("{:.4}", c.all_edge.money),
        format!("{:.2}", c.tierd.g_co2),
        pair(
            c.money_saving_vs_all_cloud_pct,
            c.co2_saving_vs_all_cloud_pct,
        ),
        pair(c.money_saving_vs_all_edge_pct, c.co2_saving_vs_all_edge_pct),
    ]
}

fn pair(money: Option<f64>, co2: Option<f64>) -> String {
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:+.1}%"));
    format!("{} / {}", f(money), f(co2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr) => {{
            let (a, b): (f64, f64) = ($a, $b);
            assert!(close(a, b), "{} = {a}, expected {b}", stringify!($a));
        }};
    }

    /// Prices chosen so the hand arithmetic is easy: 1 kWh = 3.6 MJ.
    fn prices() -> Prices {
        Prices {
            currency: "EUR".into(),
            energy_per_kwh: 0.36,
            cloud_per_1000_calls: 0.5,
            grid_g_co2_per_kwh: 360.0,
            cloud_g_co2_per_1000_calls: 2.0,
            per_disagreement: 0.01,
        }
    }

    fn usage() -> DeviceUsage {
        DeviceUsage {
            device_id: "pi-kitchen".into(),
            requests: 10_000,
            escalations: 1_000,
            cloud_answers: 1_000,
            audits: 250,
            energy_joules: Some(36_000.0),
            energy_estimated: false,
            joules_per_inference: Some(3.0),
            radio_joules_per_escalation: Some(5.0),
            agreement: Some(0.98),
            edge_only_agreement: Some(0.90),
        }
    }

    fn all_finite(c: &Comparison) -> bool {
        [&c.tierd, &c.all_cloud, &c.all_edge].iter().all(|s| {
            s.cloud_calls.is_finite()
                && s.energy_joules.is_finite()
                && s.money.is_finite()
                && s.g_co2.is_finite()
                && s.disagreements.is_none_or(f64::is_finite)
        }) && [
            c.money_saving_vs_all_cloud_pct,
            c.money_saving_vs_all_edge_pct,
            c.co2_saving_vs_all_cloud_pct,
            c.co2_saving_vs_all_edge_pct,
        ]
        .iter()
        .all(|s| s.is_none_or(f64::is_finite))
    }

    #[test]
    fn known_device_gives_hand_computed_scenarios_and_savings() {
        let r = build(&[usage()], &prices());
        let c = &r.devices[0].comparison;

        // tierd: 1,250 calls; 36,000 J = 0.01 kWh; 10,000 × 0.02 = 200 disagreements.
        // money = 0.0036 + 0.625 + 2.0 = 2.6286; CO2 = 3.6 + 2.5 = 6.1 g.
        assert_close!(c.tierd.cloud_calls, 1_250.0);
        assert_close!(c.tierd.energy_joules, 36_000.0);
        assert_close!(c.tierd.disagreements.unwrap(), 200.0);
        assert_close!(c.tierd.money, 2.6286);
        assert_close!(c.tierd.g_co2, 6.1);

        // all-cloud: radio per call = 5 × 1000 / 1250 = 4 J; 10,000 × 4 = 40,000 J = 1/90 kWh.
        // money = 0.004 + 5.0 = 5.004; CO2 = 4.0 + 20.0 = 24.0 g.
        assert_close!(c.all_cloud.cloud_calls, 10_000.0);
        assert_close!(c.all_cloud.energy_joules, 40_000.0);
        assert_eq!(c.all_cloud.disagreements, Some(0.0));
        assert_close!(c.all_cloud.money, 5.004);
        assert_close!(c.all_cloud.g_co2, 24.0);

        // all-edge: 10,000 × 3 J = 30,000 J = 1/120 kWh; 1,000 disagreements.
        // money = 0.003 + 0 + 10.0 = 10.003; CO2 = 3.0 g.
        assert_close!(c.all_edge.cloud_calls, 0.0);
        assert_close!(c.all_edge.energy_joules, 30_000.0);
        assert_close!(c.all_edge.disagreements.unwrap(), 1_000.0);
        assert_close!(c.all_edge.money, 10.003);
        assert_close!(c.all_edge.g_co2, 3.0);

        assert_close!(
            c.money_saving_vs_all_cloud_pct.unwrap(),
            (5.004 - 2.6286) / 5.004 * 100.0
        );
        assert_close!(
            c.money_saving_vs_all_edge_pct.unwrap(),
            (10.003 - 2.6286) / 10.003 * 100.0
        );
        assert_close!(
            c.co2_saving_vs_all_cloud_pct.unwrap(),
            (24.0 - 6.1) / 24.0 * 100.0
        );
        // tierd emits more than all-edge: negative, not clamped.
        assert_close!(
            c.co2_saving_vs_all_edge_pct.unwrap(),
            (3.0 - 6.1) / 3.0 * 100.0
        );

        assert_eq!(r.fleet_requests, 10_000);
        assert_eq!(r.fleet_escalations, 1_000);
        assert_eq!(r.fleet_cloud_calls, 1_250);
        // A fully known device needs no caveat; the only note is the honest one: tierd is
        // cheaper in money both ways but emits more than all-edge.
        assert_eq!(
            r.devices[0].notes,
            vec!["tierd emits 103.3% more CO2 than all-edge (6.10 vs 3.00 g)".to_string()]
        );
    }

    #[test]
    fn tierd_dearer_than_all_edge_is_negative_and_said_in_words() {
        // A small accuracy price: all-edge 0.003 + 1,000 × 0.0005 = 0.503, tierd 0.6286 +
        // 200 × 0.0005 = 0.7286. The baseline is well above 1 % of tierd: a real figure.
        let p = Prices {
            per_disagreement: 0.0005,
            ..prices()
        };
        let r = build(&[usage()], &p);
        let c = &r.devices[0].comparison;
        assert_close!(
            c.money_saving_vs_all_edge_pct.unwrap(),
            (0.503 - 0.7286) / 0.503 * 100.0
        );
        assert!(c.money_saving_vs_all_edge_pct.unwrap() < 0.0);
        let notes = &r.devices[0].notes;
        assert!(
            notes.iter().any(|n| n.starts_with(
                "tierd costs 44.9% more than all-edge (0.7286 vs 0.5030 EUR): escalations"
            )),
            "{notes:?}"
        );
        assert!(!notes.iter().any(|n| n.contains("no relative figure")));
    }

    #[test]
    fn near_zero_baseline_gives_absolute_figures_in_words_not_a_percentage() {
        // Accuracy unpriced: all-edge money is only its energy, 0.003 EUR against tierd's
        // 0.6286 (0.48 %, under the 1 % rule): the ratio would read -20853 %.
        let p = Prices {
            per_disagreement: 0.0,
            ..prices()
        };
        let r = build(&[usage()], &p);
        let c = &r.devices[0].comparison;
        assert_eq!(c.money_saving_vs_all_edge_pct, None);
        // The other three baselines are large enough: their figures stay.
        assert_close!(
            c.money_saving_vs_all_cloud_pct.unwrap(),
            (5.004 - 0.6286) / 5.004 * 100.0
        );
        assert_close!(
            c.co2_saving_vs_all_edge_pct.unwrap(),
            (3.0 - 6.1) / 3.0 * 100.0
        );
        let notes = &r.devices[0].notes;
        assert!(
            notes.iter().any(|n| n.starts_with(
                "all-edge costs 0.0030 EUR, under 1% of tierd's 0.6286 EUR: no relative \
                 figure; tierd costs 0.6256 EUR more (0.6286 vs 0.0030 EUR): escalations"
            )),
            "{notes:?}"
        );
        assert!(!notes.iter().any(|n| n.contains("% more than all-edge (")));
        assert!(r.notes.iter().any(|n| n.contains("per_disagreement = 0")));
        // The table shows '-' for the withheld figure and explains it.
        let text = render_text(&r);
        assert!(text.contains("- / -103.3%"), "{text}");
        assert!(text.contains("'-' = no relative figure"), "{text}");
        assert!(!text.contains("20853"), "{text}");

        // Far below the figures' printed precision the note still shows a non-zero amount:
        // 10,000 × 0.01 J = 100 J = 1/36,000 kWh = 0.00001 EUR.
        let u = DeviceUsage {
            joules_per_inference: Some(0.01),
            ..usage()
        };
        let r = build(&[u], &p);
        let d = &r.devices[0];
        assert_eq!(d.comparison.money_saving_vs_all_edge_pct, None);
        assert_eq!(d.comparison.co2_saving_vs_all_edge_pct, None);
        assert!(
            d.notes.iter().any(|n| n.starts_with(
                "all-edge costs 0.000010 EUR, under 1% of tierd's 0.6286 EUR: no relative figure"
            )),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes.iter().any(|n| n.starts_with(
                "all-edge emits 0.01 g CO2, under 1% of tierd's 6.10 g: no relative figure; \
                 tierd emits 6.09 g CO2 more (6.10 vs 0.01 g)"
            )),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn zero_baseline_gives_absolute_figures_in_words() {
        // No local inference figure: all-edge energy is 0, and with accuracy unpriced so is
        // its money and CO2.
        let u = DeviceUsage {
            joules_per_inference: None,
            ..usage()
        };
        let p = Prices {
            per_disagreement: 0.0,
            ..prices()
        };
        let r = build(&[u], &p);
        let d = &r.devices[0];
        let c = &d.comparison;
        assert_eq!(c.all_edge.money, 0.0);
        assert_eq!(c.money_saving_vs_all_edge_pct, None);
        assert_eq!(c.co2_saving_vs_all_edge_pct, None);
        assert!(c.money_saving_vs_all_cloud_pct.is_some());
        for want in [
            "all-edge costs 0 EUR: no relative figure; tierd costs 0.6286 EUR more (0.6286 vs \
             0.0000 EUR)",
            "all-edge emits 0 g CO2: no relative figure; tierd emits 6.10 g CO2 more (6.10 vs \
             0.00 g)",
        ] {
            assert!(
                d.notes.iter().any(|n| n.starts_with(want)),
                "{want}: {:?}",
                d.notes
            );
        }
        // The fleet row says the same about the fleet.
        assert!(
            r.notes
                .iter()
                .any(|n| n.starts_with("all-edge costs 0 EUR: no relative figure; fleet costs")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn relative_figure_rule_is_one_percent_of_the_larger_figure() {
        assert_close!(saving(1.0, 100.0).unwrap(), -9_900.0);
        assert_eq!(saving(0.999, 100.0), None);
        assert_eq!(saving(0.0, 1.0), None);
        assert_eq!(saving(0.0, 0.0), None);
        // A baseline far above tierd's figure always has a meaningful saving.
        assert_close!(saving(100.0, 0.5).unwrap(), 99.5);
        assert_close!(saving(100.0, 0.0).unwrap(), 100.0);
        // Small but comparable figures are fine: the rule is relative, not absolute.
        assert_close!(saving(2e-9, 1e-9).unwrap(), 50.0);
        assert_eq!(figure(0.0, 4), "0.0000");
        assert_eq!(figure(0.6286, 4), "0.6286");
        assert_eq!(figure(0.00003, 4), "0.000030");
        assert_eq!(figure(1e-20, 4), "1.0e-20");
    }

    #[test]
    fn audits_are_cloud_calls_in_every_figure() {
        // The same device with and without 250 audits. Both agents' radio per cloud call is
        // 4 J: the agent spreads the audits' radio over its escalations, so with audits it
        // reports 4 × 1,250 / 1,000 = 5 J per escalation. No meter: energy is rebuilt.
        let without = DeviceUsage {
            audits: 0,
            energy_joules: None,
            radio_joules_per_escalation: Some(4.0),
            ..usage()
        };
        let with = DeviceUsage {
            audits: 250,
            energy_joules: None,
            radio_joules_per_escalation: Some(5.0),
            ..usage()
        };
        let r = build(&[without, with], &prices());
        let (a, b) = (&r.devices[0].comparison, &r.devices[1].comparison);
        assert_close!(a.tierd.cloud_calls, 1_000.0);
        assert_close!(b.tierd.cloud_calls, 1_250.0);
        // 10,000 × 3 J + (1,000 + audits) × 4 J.
        assert_close!(a.tierd.energy_joules, 34_000.0);
        assert_close!(b.tierd.energy_joules, 35_000.0);
        // 250 calls at 0.5 EUR/1,000 + 1,000 J at 0.36 EUR/kWh; 250 × 2 g/1,000 + 1,000 J at
        // 360 g/kWh.
        assert_close!(b.tierd.money - a.tierd.money, 0.125 + 0.0001);
        assert_close!(b.tierd.g_co2 - a.tierd.g_co2, 0.5 + 0.1);
        // The baselines do not depend on audits (nothing to audit in either).
        assert_eq!(a.all_cloud, b.all_cloud);
        assert_eq!(a.all_edge, b.all_edge);
        assert_close!(b.all_cloud.energy_joules, 40_000.0);
        assert_eq!(r.fleet_cloud_calls, 2_250);
        assert_eq!(r.fleet_escalations, 2_000);

        // A device that only audits: every audit is still a call with its radio.
        let auditor = DeviceUsage {
            escalations: 0,
            cloud_answers: 0,
            audits: 200,
            energy_joules: None,
            radio_joules_per_escalation: Some(4.0),
            ..usage()
        };
        let r = build(std::slice::from_ref(&auditor), &prices());
        let c = &r.devices[0].comparison;
        assert_close!(c.tierd.cloud_calls, 200.0);
        assert_close!(c.tierd.energy_joules, 30_000.0 + 200.0 * 4.0);
        assert_eq!(r.fleet_cloud_calls, 200);
        let row = render_text(&r)
            .lines()
            .find(|l| l.starts_with("pi-kitchen "))
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(row.contains("  200  "), "{row}");
        // Without a radio figure the audits' radio is missing, and the note says so.
        let r = build(
            &[DeviceUsage {
                radio_joules_per_escalation: None,
                ..auditor
            }],
            &prices(),
        );
        assert_close!(r.devices[0].comparison.tierd.energy_joules, 30_000.0);
        assert!(
            r.devices[0]
                .notes
                .iter()
                .any(|n| n.contains("radio_joules_per_escalation unknown: radio counted as 0")),
            "{:?}",
            r.devices[0].notes
        );
    }

    #[test]
    fn missing_meter_rebuilds_energy_from_per_request_figures_with_a_note() {
        let u = DeviceUsage {
            energy_joules: None,
            ..usage()
        };
        let r = build(&[u], &prices());
        let d = &r.devices[0];
        // 10,000 × 3 + 1,000 × 5 = 35,000 J.
        assert_close!(d.comparison.tierd.energy_joules, 35_000.0);
        assert!(d.notes.iter().any(|n| n.contains("no meter total")));
    }

    #[test]
    fn no_energy_figures_at_all_count_as_zero_with_notes() {
        let u = DeviceUsage {
            energy_joules: None,
            joules_per_inference: None,
            radio_joules_per_escalation: None,
            ..usage()
        };
        let r = build(&[u], &prices());
        let d = &r.devices[0];
        let c = &d.comparison;
        assert_eq!(c.tierd.energy_joules, 0.0);
        assert_eq!(c.all_cloud.energy_joules, 0.0);
        assert_eq!(c.all_edge.energy_joules, 0.0);
        assert!(d.notes.iter().any(|n| n.contains("no energy figures")));
        assert!(d
            .notes
            .iter()
            .any(|n| n.contains("all-cloud device energy")));
        assert!(d.notes.iter().any(|n| n.contains("all-edge energy")));
        assert!(all_finite(c));
    }

    #[test]
    fn missing_agreement_leaves_accuracy_unpriced_everywhere_with_a_note() {
        let u = DeviceUsage {
            agreement: None,
            ..usage()
        };
        let r = build(&[u], &prices());
        let d = &r.devices[0];
        let c = &d.comparison;
        assert_eq!(c.tierd.disagreements, None);
        // Known but not charged: charging all-edge alone would flatter tierd.
        assert_close!(c.all_edge.disagreements.unwrap(), 1_000.0);
        assert_close!(c.tierd.money, 0.6286);
        assert_close!(c.all_edge.money, 0.003);
        assert!(
            d.notes
                .iter()
                .any(|n| n.contains("accuracy is not priced") && n.contains("agreement")),
            "{:?}",
            d.notes
        );
        assert_eq!(r.fleet.tierd.disagreements, None);
        assert!(r.notes.iter().any(|n| n.contains("no agreement estimate")));

        let u = DeviceUsage {
            edge_only_agreement: None,
            ..usage()
        };
        let r = build(&[u], &prices());
        let c = &r.devices[0].comparison;
        assert_eq!(c.all_edge.disagreements, None);
        assert_close!(c.tierd.disagreements.unwrap(), 200.0);
        assert_close!(c.tierd.money, 0.6286);
        assert!(r.devices[0]
            .notes
            .iter()
            .any(|n| n.contains("edge_only_agreement unknown")));
    }

    #[test]
    fn fallbacks_are_flagged_as_possible_extra_disagreements() {
        let u = DeviceUsage {
            cloud_answers: 970,
            ..usage()
        };
        let r = build(&[u], &prices());
        assert!(r.devices[0]
            .notes
            .iter()
            .any(|n| n.contains("30 escalations fell back")));
    }

    #[test]
    fn zero_traffic_device_has_no_nan_and_no_savings() {
        let u = DeviceUsage {
            device_id: "idle".into(),
            requests: 0,
            escalations: 0,
            cloud_answers: 0,
            audits: 0,
            energy_joules: Some(0.0),
            energy_estimated: false,
            joules_per_inference: None,
            radio_joules_per_escalation: None,
            agreement: Some(1.0),
            edge_only_agreement: Some(1.0),
        };
        let r = build(std::slice::from_ref(&u), &prices());
        let c = &r.devices[0].comparison;
        assert!(all_finite(c));
        assert!(all_finite(&r.fleet));
        assert_eq!(c.tierd.money, 0.0);
        assert_eq!(c.money_saving_vs_all_cloud_pct, None);
        assert_eq!(c.money_saving_vs_all_edge_pct, None);
        assert_eq!(c.co2_saving_vs_all_cloud_pct, None);
        assert_eq!(c.co2_saving_vs_all_edge_pct, None);
        assert!(r.devices[0].notes.iter().any(|n| n.contains("no answered")));
        // Nothing to rebuild, so no spurious "counted as 0" warnings.
        assert!(!r.devices[0]
            .notes
            .iter()
            .any(|n| n.contains("counted as 0")));
        let text = render_text(&r);
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");

        // Same with every optional figure missing.
        let bare = DeviceUsage {
            energy_joules: None,
            agreement: None,
            edge_only_agreement: None,
            ..u
        };
        let r = build(&[bare], &prices());
        assert!(all_finite(&r.devices[0].comparison));
    }

    #[test]
    fn garbage_figures_are_ignored_not_propagated() {
        let u = DeviceUsage {
            energy_joules: Some(f64::NAN),
            joules_per_inference: Some(-1.0),
            radio_joules_per_escalation: Some(f64::INFINITY),
            agreement: Some(1.5),
            edge_only_agreement: Some(f64::NAN),
            ..usage()
        };
        let r = build(&[u], &prices());
        let d = &r.devices[0];
        assert!(all_finite(&d.comparison));
        assert!(all_finite(&r.fleet));
        for key in [
            "energy_joules",
            "joules_per_inference",
            "radio_joules_per_escalation",
            "agreement",
            "edge_only_agreement",
        ] {
            assert!(
                d.notes
                    .iter()
                    .any(|n| n.starts_with(&format!("ignored {key} "))),
                "{key}: {:?}",
                d.notes
            );
        }
    }

    #[test]
    fn fleet_is_the_sum_of_device_scenarios() {
        let a = usage();
        let b = DeviceUsage {
            device_id: "jetson-door".into(),
            requests: 2_000,
            escalations: 500,
            cloud_answers: 500,
            audits: 0,
            energy_joules: Some(7_200.0),
            energy_estimated: true,
            joules_per_inference: Some(1.8),
            radio_joules_per_escalation: Some(10.0),
            agreement: Some(0.99),
            edge_only_agreement: Some(0.80),
        };
        let r = build(&[a, b], &prices());
        let (x, y) = (&r.devices[0].comparison, &r.devices[1].comparison);

        // b by hand: tierd 500 calls, 7,200 J = 0.002 kWh, 20 disagreements:
        // money = 0.00072 + 0.25 + 0.2 = 0.45072; CO2 = 0.72 + 1.0 = 1.72.
        // all-cloud: 2,000 × 10 J = 20,000 J; money = 0.002 + 1.0 = 1.002; CO2 = 2 + 4 = 6.
        // all-edge: 3,600 J = 0.001 kWh, 400 disagreements; money = 0.00036 + 4.0; CO2 0.36.
        assert_close!(y.tierd.money, 0.45072);
        assert_close!(y.tierd.g_co2, 1.72);
        assert_close!(y.all_cloud.money, 1.002);
        assert_close!(y.all_cloud.g_co2, 6.0);
        assert_close!(y.all_edge.money, 4.00036);
        assert_close!(y.all_edge.g_co2, 0.36);

        let f = &r.fleet;
        for (fs, xs, ys) in [
            (&f.tierd, &x.tierd, &y.tierd),
            (&f.all_cloud, &x.all_cloud, &y.all_cloud),
            (&f.all_edge, &x.all_edge, &y.all_edge),
        ] {
            assert_close!(fs.cloud_calls, xs.cloud_calls + ys.cloud_calls);
            assert_close!(fs.energy_joules, xs.energy_joules + ys.energy_joules);
            assert_close!(fs.money, xs.money + ys.money);
            assert_close!(fs.g_co2, xs.g_co2 + ys.g_co2);
            assert_close!(
                fs.disagreements.unwrap(),
                xs.disagreements.unwrap() + ys.disagreements.unwrap()
            );
        }
        assert_close!(f.tierd.money, 2.6286 + 0.45072);
        // The fleet saving weighs devices by traffic: it is the ratio of the sums.
        assert_close!(
            f.money_saving_vs_all_cloud_pct.unwrap(),
            ((5.004 + 1.002) - (2.6286 + 0.45072)) / (5.004 + 1.002) * 100.0
        );
        assert_eq!(r.fleet_requests, 12_000);
        assert_eq!(r.fleet_escalations, 1_500);
        assert_eq!(r.fleet_cloud_calls, 1_750);
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("1 of 2 devices have estimated")));
    }

    #[test]
    fn empty_fleet_is_all_zero_with_a_note() {
        let r = build(&[], &Prices::default());
        assert!(all_finite(&r.fleet));
        assert_eq!(r.fleet.tierd.money, 0.0);
        assert_eq!(r.fleet.money_saving_vs_all_cloud_pct, None);
        assert!(r.notes.iter().any(|n| n.contains("no devices")));
        assert!(render_text(&r).contains("fleet"));
    }

    #[test]
    fn render_text_has_a_row_per_device_a_fleet_row_and_explains_the_mark() {
        let b = DeviceUsage {
            device_id: "jetson-door".into(),
            energy_estimated: true,
            ..usage()
        };
        let r = build(&[usage(), b], &prices());
        let text = render_text(&r);
        let lines: Vec<&str> = text.lines().collect();
        let row = |id: &str| {
            *lines
                .iter()
                .find(|l| l.starts_with(&format!("{id} ")))
                .unwrap_or_else(|| panic!("no row for {id} in\n{text}"))
        };
        let kitchen = row("pi-kitchen");
        let door = row("jetson-door");
        let fleet = row("fleet");
        assert!(kitchen.contains("10000") && kitchen.contains("10.0") && kitchen.contains("1250"));
        assert!(kitchen.contains("36000.0 ") && !kitchen.contains('*'));
        assert!(door.contains("36000.0*"));
        assert!(fleet.contains("20000") && fleet.contains("2500") && fleet.contains("72000.0*"));
        // tierd money and both baselines, to 4 places.
        assert!(
            kitchen.contains("2.6286") && kitchen.contains("5.0040") && kitchen.contains("10.0030")
        );
        assert!(kitchen.contains("+47.5%"), "{kitchen}");
        // Fixed width: every table row is as wide as the header.
        let header = lines.iter().find(|l| l.starts_with("device")).unwrap();
        for l in [kitchen, door, fleet] {
            assert_eq!(l.chars().count(), header.chars().count(), "{l}");
        }
        assert!(text.contains("* energy estimated"));
        assert!(text.contains("EUR"));
    }

    #[test]
    fn validate_rejects_negatives_nan_and_bad_currency_naming_the_key() {
        assert_eq!(Prices::default().validate(), Ok(()));
        type Break = fn(&mut Prices);
        let cases: [(&str, Break); 6] = [
            ("prices.energy_per_kwh", |p| p.energy_per_kwh = -0.1),
            ("prices.cloud_per_1000_calls", |p| {
                p.cloud_per_1000_calls = f64::NAN
            }),
            ("prices.grid_g_co2_per_kwh", |p| {
                p.grid_g_co2_per_kwh = f64::INFINITY
            }),
            ("prices.cloud_g_co2_per_1000_calls", |p| {
                p.cloud_g_co2_per_1000_calls = -2.0
            }),
            ("prices.per_disagreement", |p| p.per_disagreement = f64::NAN),
            ("prices.currency", |p| p.currency = "EURO-DOLLAR".into()),
        ];
        for (key, break_it) in cases {
            let mut p = Prices::default();
            break_it(&mut p);
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let empty = Prices {
            currency: String::new(),
            ..Prices::default()
        };
        assert!(empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("prices.currency"));
        let zero = Prices {
            energy_per_kwh: 0.0,
            per_disagreement: 0.0,
            ..Prices::default()
        };
        assert_eq!(zero.validate(), Ok(()));
        // Invalid prices still produce a report, flagged.
        let r = build(
            &[usage()],
            &Prices {
                energy_per_kwh: -1.0,
                ..Prices::default()
            },
        );
        assert!(r.notes.iter().any(|n| n.contains("prices.energy_per_kwh")));
    }

    #[test]
    fn prices_defaults_round_trip_through_toml_and_typos_are_rejected() {
        let d = Prices::default();
        assert_eq!(d.currency, "EUR");
        assert_eq!(d.energy_per_kwh, 0.30);
        assert_eq!(d.cloud_per_1000_calls, 0.40);
        assert_eq!(d.grid_g_co2_per_kwh, 400.0);
        assert_eq!(d.cloud_g_co2_per_1000_calls, 2.0);
        assert_eq!(d.per_disagreement, 0.0);

        let text = toml::to_string(&d).unwrap();
        assert_eq!(toml::from_str::<Prices>(&text).unwrap(), d);
        assert_eq!(toml::from_str::<Prices>("").unwrap(), d);

        let partial: Prices =
            toml::from_str("currency = \"USD\"\nper_disagreement = 0.05").unwrap();
        assert_eq!(partial.currency, "USD");
        assert_eq!(partial.per_disagreement, 0.05);
        assert_eq!(partial.energy_per_kwh, 0.30);

        let e = toml::from_str::<Prices>("energy_per_kwhh = 0.3").unwrap_err();
        assert!(e.to_string().contains("energy_per_kwhh"), "{e}");
    }
}

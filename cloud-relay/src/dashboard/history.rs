//! Bounded in-memory history per device: a ring of telemetry points, and smaller rings of
//! agreement estimates, the tuner's pushes and online/offline changes. Pure: fed by the fleet
//! ([`Fleet`](crate::fleet::Fleet) holds one), read by the dashboard.
//!
//! # Limits
//! - [`MAX_POINTS`] telemetry points per device (default 360: three hours at the agent's
//!   default 30 s telemetry interval), and as many agreement estimates (one per calibration
//!   window); the oldest goes first.
//! - [`MAX_MARKS`] tuner pushes and as many online/offline changes per device (default 60).
//! - [`MAX_DEVICES`] devices (default 500). A device beyond it takes the place of the device
//!   heard from least recently only if that one has been silent for [`IDLE_EVICT_MS`] (default
//!   one hour); otherwise it gets no history (counted in [`History::untracked`]) and is still
//!   shown with its latest state. So a fleet larger than the limit keeps a stable set of
//!   histories instead of every device evicting another one.
//!
//! A telemetry point is 72 bytes and an agreement estimate 48, so at the defaults the points of
//! all devices stay under 22 MB, the marks (a push keeps at most 80 characters of its reason)
//! under 4 MB more.
//! Nothing here is persisted: a restarted relay starts with empty histories (the latest state
//! of each device comes back from the fleet store as before).

use std::collections::{BTreeMap, VecDeque};

use tierd_protocol::{LatencySeries, TelemetryReport};

/// Telemetry points kept per device.
pub const MAX_POINTS: usize = 360;
/// Tuner pushes and status changes kept per device (each).
pub const MAX_MARKS: usize = 60;
/// Devices with a history.
pub const MAX_DEVICES: usize = 500;
/// How long a device must have been silent before a new device may take its history's place.
pub const IDLE_EVICT_MS: u64 = 60 * 60 * 1000;
/// Longest text kept from the wire in a history (a push's reason, the meter's name).
const MAX_TEXT: usize = 80;

/// The limits of a [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_devices: usize,
    pub max_points: usize,
    pub max_marks: usize,
    pub idle_evict_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_devices: MAX_DEVICES,
            max_points: MAX_POINTS,
            max_marks: MAX_MARKS,
            idle_evict_ms: IDLE_EVICT_MS,
        }
    }
}

/// The tiers a point counts requests of, in plot order.
pub const TIERS: [&str; 4] = ["edge", "cloud", "edge_fallback", "overloaded"];

/// Latency paths a point keeps p50/p95 of: answered at the edge, by the cloud, and escalated
/// but answered locally after all.
pub const PATHS: [LatencySeries; 3] = [
    LatencySeries::PathEdge,
    LatencySeries::PathCloud,
    LatencySeries::PathEdgeFallback,
];

/// One telemetry window of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Relay clock, Unix ms, when the report arrived.
    pub t_ms: u64,
    /// Requests in the window by [`TIERS`] (saturated at `u32::MAX`).
    pub tiers: [u32; 4],
    pub threshold: f32,
    /// p50 and p95 in µs per [`PATHS`]; `None` when the window had no such request.
    pub latency_us: [Option<(u32, u32)>; 3],
    /// Local compute per inference, joules (an idle window has none).
    pub joules_per_inference: Option<f32>,
}

impl Point {
    pub fn from_report(r: &TelemetryReport, t_ms: u64) -> Point {
        let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let w = &r.window;
        let latency_us = PATHS.map(|p| {
            r.latency(p)
                .filter(|l| l.count > 0)
                .map(|l| (sat(l.p50_us), sat(l.p95_us)))
        });
        Point {
            t_ms,
            tiers: [
                sat(w.edge),
                sat(w.cloud),
                sat(w.edge_fallback),
                sat(w.overloaded),
            ],
            threshold: r.threshold,
            latency_us,
            joules_per_inference: r
                .energy
                .joules_per_inference
                .filter(|j| j.is_finite() && *j >= 0.0)
                .map(|j| j as f32),
        }
    }

    /// Answered requests (edge, cloud, fallback).
    pub fn answered(&self) -> u64 {
        self.tiers[..3].iter().map(|&n| u64::from(n)).sum()
    }

    /// Escalated share of the answered requests; `None` for an idle window.
    pub fn escalation_rate(&self) -> Option<f64> {
        let answered = self.answered();
        let escalated = u64::from(self.tiers[1]) + u64::from(self.tiers[2]);
        (answered > 0).then(|| escalated as f64 / answered as f64)
    }
}

/// The tuner's agreement estimate after one calibration window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgreementPoint {
    pub t_ms: u64,
    /// Threshold the device ran while the window was gathered.
    pub running: f32,
    /// Estimated agreement with the cloud at `running`, and its (1 − δ) lower bound.
    pub agreement: f64,
    pub lower_bound: f64,
    /// The threshold the tuner certifies and the lower bound it certifies there.
    pub certified_threshold: f32,
    pub certified_bound: f64,
    pub insufficient_evidence: bool,
}

/// A tuned threshold the relay pushed to the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub t_ms: u64,
    pub threshold: f32,
    pub why: String,
}

/// An online/offline change of the device's retained status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    pub t_ms: u64,
    pub online: bool,
}

/// One device's history.
#[derive(Debug, Clone, Default)]
pub struct DeviceHistory {
    pub points: VecDeque<Point>,
    pub agreement: VecDeque<AgreementPoint>,
    pub pushes: VecDeque<Push>,
    pub status: VecDeque<StatusChange>,
    /// The energy meter of the latest report, and whether it is an estimate.
    pub meter: String,
    pub estimated: bool,
    /// `(boot_id, seq)` of the latest point: a report seen again adds nothing.
    last_report: Option<(u64, u64)>,
    /// When anything was last recorded (relay clock).
    last_ms: u64,
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, cap: usize) {
    if cap == 0 {
        return;
    }
    while ring.len() >= cap {
        ring.pop_front();
    }
    ring.push_back(item);
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// Every device's history, within [`Limits`].
#[derive(Debug, Clone, Default)]
pub struct History {
    devices: BTreeMap<String, DeviceHistory>,
    limits: Limits,
    /// Times a device got no history because the limit of devices was reached.
    pub untracked: u64,
}

impl History {
    pub fn new(limits: Limits) -> Self {
        History {
            devices: BTreeMap::new(),
            limits,
            untracked: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn get(&self, device: &str) -> Option<&DeviceHistory> {
        self.devices.get(device)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &DeviceHistory)> {
        self.devices.iter()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The device's history, made if there is room (see the module doc).
    fn slot(&mut self, device: &str, now_ms: u64) -> Option<&mut DeviceHistory> {
        if !self.devices.contains_key(device) {
            if self.devices.len() >= self.limits.max_devices {
                let idle = self
                    .devices
                    .iter()
                    .min_by_key(|(_, h)| h.last_ms)
                    .filter(|(_, h)| now_ms.saturating_sub(h.last_ms) >= self.limits.idle_evict_ms)
                    .map(|(id, _)| id.clone());
                match idle {
                    Some(id) => {
                        self.devices.remove(&id);
                    }
                    None => {
                        self.untracked = self.untracked.saturating_add(1);
                        return None;
                    }
                }
            }
            if self.limits.max_devices == 0 {
                return None;
            }
        }
        let h = self.devices.entry(device.to_string()).or_default();
        h.last_ms = h.last_ms.max(now_ms);
        Some(h)
    }

    /// A telemetry report the fleet filed (a report already recorded adds nothing).
    pub fn record_report(&mut self, device: &str, r: &TelemetryReport, now_ms: u64) {
        let cap = self.limits.max_points;
        let Some(h) = self.slot(device, now_ms) else {
            return;
        };
        let key = (r.boot_id, r.seq);
        if h.last_report == Some(key) {
            return;
        }
        h.last_report = Some(key);
        if h.meter != r.energy.meter {
            h.meter = truncate(&r.energy.meter);
        }
        h.estimated = r.energy.estimated;
        push_bounded(&mut h.points, Point::from_report(r, now_ms), cap);
    }

    /// The tuner's estimate after a calibration window.
    pub fn record_agreement(&mut self, device: &str, a: AgreementPoint) {
        let cap = self.limits.max_points;
        if let Some(h) = self.slot(device, a.t_ms) {
            push_bounded(&mut h.agreement, a, cap);
        }
    }

    /// A tuned threshold pushed to the device.
    pub fn record_push(&mut self, device: &str, t_ms: u64, threshold: f32, why: &str) {
        let cap = self.limits.max_marks;
        if let Some(h) = self.slot(device, t_ms) {
            let why = truncate(why);
            push_bounded(
                &mut h.pushes,
                Push {
                    t_ms,
                    threshold,
                    why,
                },
                cap,
            );
        }
    }

    /// The device's status as filed; only a change (or the first one) is kept.
    pub fn record_status(&mut self, device: &str, online: bool, t_ms: u64) {
        let cap = self.limits.max_marks;
        if let Some(h) = self.slot(device, t_ms) {
            if h.status.back().map(|s| s.online) != Some(online) {
                push_bounded(&mut h.status, StatusChange { t_ms, online }, cap);
            }
        }
    }
}

/// The fleet's requests per tier in one time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Bucket {
    /// Start of the bucket, Unix ms.
    pub t_ms: u64,
    pub tiers: [u64; 4],
}

impl Bucket {
    pub fn escalation_rate(&self) -> Option<f64> {
        let answered: u64 = self.tiers[..3].iter().sum();
        (answered > 0).then(|| (self.tiers[1] + self.tiers[2]) as f64 / answered as f64)
    }
}

/// The whole fleet's traffic from `from_ms` to `to_ms` in `n` equal buckets (each point counted
/// in the bucket its report arrived in). Empty when `n` is 0 or the span is empty.
pub fn fleet_buckets(h: &History, from_ms: u64, to_ms: u64, n: usize) -> Vec<Bucket> {
    if n == 0 || to_ms <= from_ms {
        return Vec::new();
    }
    let span = to_ms - from_ms;
    let width = span.div_ceil(n as u64).max(1);
    let mut out: Vec<Bucket> = (0..n as u64)
        .map(|i| Bucket {
            t_ms: from_ms + i * width,
            tiers: [0; 4],
        })
        .collect();
    for (_, d) in h.iter() {
        for p in d
            .points
            .iter()
            .filter(|p| (from_ms..=to_ms).contains(&p.t_ms))
        {
            let i = (((p.t_ms - from_ms) / width) as usize).min(n - 1);
            for (acc, v) in out[i].tiers.iter_mut().zip(p.tiers) {
                *acc = acc.saturating_add(u64::from(v));
            }
        }
    }
    out
}

/// The earliest point of any device, Unix ms.
pub fn earliest(h: &History) -> Option<u64> {
    h.iter()
        .filter_map(|(_, d)| d.points.front().map(|p| p.t_ms))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierd_protocol::{LatencySummary, TierCounts};

    fn report(seq: u64, edge: u64, cloud: u64) -> TelemetryReport {
        let mut r = crate::fleet::testing::report("d", 7, seq, edge);
        r.window = TierCounts {
            edge,
            cloud,
            edge_fallback: 1,
            overloaded: 2,
            ..Default::default()
        };
        r.latency = vec![LatencySummary {
            series: LatencySeries::PathCloud,
            count: 3,
            p50_us: 40_000,
            p95_us: 90_000,
            p99_us: 99_000,
            max_us: 120_000,
        }];
        r.energy.joules_per_inference = Some(0.25);
        r
    }

    fn limits(devices: usize, points: usize) -> Limits {
        Limits {
            max_devices: devices,
            max_points: points,
            max_marks: 2,
            idle_evict_ms: 1000,
        }
    }

    #[test]
    fn a_point_keeps_the_window_its_latency_and_energy() {
        let p = Point::from_report(&report(1, 6, 3), 5);
        assert_eq!(p.tiers, [6, 3, 1, 2]);
        assert_eq!(p.answered(), 10);
        assert_eq!(p.escalation_rate(), Some(0.4));
        assert_eq!(p.latency_us, [None, Some((40_000, 90_000)), None]);
        assert_eq!(p.joules_per_inference, Some(0.25));
        let idle = Point::from_report(&report(2, 0, 0), 5);
        assert_eq!(idle.answered(), 1);
        let mut r = report(3, 0, 0);
        r.window = TierCounts::default();
        r.energy.joules_per_inference = Some(f64::NAN);
        let none = Point::from_report(&r, 5);
        assert_eq!(
            (none.escalation_rate(), none.joules_per_inference),
            (None, None)
        );
        // Counts beyond u32 saturate rather than wrap.
        r.window.edge = u64::from(u32::MAX) + 5;
        assert_eq!(Point::from_report(&r, 5).tiers[0], u32::MAX);
    }

    #[test]
    fn points_are_bounded_per_device_oldest_first_and_counted_once() {
        let mut h = History::new(limits(4, 3));
        for seq in 1..=5 {
            h.record_report("d", &report(seq, seq, 0), seq * 10);
        }
        // The same report again (a resend) adds nothing.
        h.record_report("d", &report(5, 5, 0), 99);
        let d = h.get("d").unwrap();
        let times: Vec<u64> = d.points.iter().map(|p| p.t_ms).collect();
        assert_eq!(times, [30, 40, 50]);
        assert_eq!(d.meter, "estimate:generic-x86");
        assert!(d.estimated);
        // A new boot starting at seq 1 again is a new point.
        let mut r = report(1, 1, 0);
        r.boot_id = 8;
        h.record_report("d", &r, 60);
        assert_eq!(h.get("d").unwrap().points.len(), 3);
        assert_eq!(h.get("d").unwrap().points.back().unwrap().t_ms, 60);
    }

    #[test]
    fn marks_are_bounded_and_status_keeps_only_changes() {
        let mut h = History::new(limits(4, 3));
        for (i, online) in [true, true, false, false, true].into_iter().enumerate() {
            h.record_status("d", online, i as u64);
        }
        let st: Vec<(u64, bool)> = h
            .get("d")
            .unwrap()
            .status
            .iter()
            .map(|s| (s.t_ms, s.online))
            .collect();
        // Changes at 0 (online), 2 (offline), 4 (online); two kept.
        assert_eq!(st, [(2, false), (4, true)]);
        let long = "x".repeat(1000);
        for t in 0..5 {
            h.record_push("d", t, 0.5, &long);
        }
        let pushes = &h.get("d").unwrap().pushes;
        assert_eq!(pushes.iter().map(|p| p.t_ms).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(pushes[0].why.chars().count(), MAX_TEXT);
    }

    #[test]
    fn devices_are_bounded_and_only_idle_ones_make_room() {
        let mut h = History::new(limits(2, 3));
        h.record_report("a", &report(1, 1, 0), 100);
        h.record_report("b", &report(1, 1, 0), 200);
        // Both heard from within the idle time: the newcomer gets no history.
        h.record_report("c", &report(1, 1, 0), 900);
        assert!(h.get("c").is_none());
        assert_eq!((h.len(), h.untracked), (2, 1));
        // `a` silent for 1000 ms: the least recently heard gives its place.
        h.record_status("c", true, 1100);
        assert!(h.get("a").is_none());
        assert!(h.get("b").is_some() && h.get("c").is_some());
        assert_eq!(h.len(), 2);
        // Known devices always record.
        h.record_report("b", &report(2, 1, 0), 1101);
        assert_eq!(h.get("b").unwrap().points.len(), 2);
        // No room at all: nothing is kept, nothing panics.
        let mut none = History::new(limits(0, 3));
        none.record_report("a", &report(1, 1, 0), 1);
        assert!(none.is_empty());
        let mut no_points = History::new(limits(1, 0));
        no_points.record_report("a", &report(1, 1, 0), 1);
        assert!(no_points.get("a").unwrap().points.is_empty());
    }

    #[test]
    fn the_fleet_is_bucketed_by_arrival() {
        let mut h = History::new(limits(4, 10));
        h.record_report("a", &report(1, 4, 0), 1000);
        h.record_report("a", &report(2, 4, 4), 1900);
        h.record_report("b", &report(1, 2, 2), 1950);
        h.record_report("b", &report(2, 2, 2), 5000); // outside the span
        assert_eq!(earliest(&h), Some(1000));
        let b = fleet_buckets(&h, 1000, 2000, 2);
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].t_ms, b[1].t_ms), (1000, 1500));
        assert_eq!(b[0].tiers, [4, 0, 1, 2]);
        assert_eq!(b[1].tiers, [6, 6, 2, 4]);
        assert_eq!(b[1].escalation_rate(), Some(8.0 / 14.0));
        assert!(fleet_buckets(&h, 1000, 1000, 4).is_empty());
        assert!(fleet_buckets(&h, 1000, 2000, 0).is_empty());
        assert_eq!(Bucket::default().escalation_rate(), None);
        assert_eq!(earliest(&History::default()), None);
    }
}

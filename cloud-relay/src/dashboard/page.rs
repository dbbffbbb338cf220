//! The dashboard's pages: snapshots taken under the fleet's lock ([`Overview::build`],
//! [`DeviceView::build`]), then rendered to HTML without it. Every string from a device goes
//! through [`esc`].

use std::fmt::Write as _;

use super::history::{self, DeviceHistory, Push, PATHS, TIERS};
use super::svg::{self, esc, Chart, HLine, Marker, Series, Stacked};
use super::{agreement_point, usages, FLEET_BUCKETS, MAX_FLEET_MARKERS, MAX_ROWS, REFRESH_S};
use crate::fleet::{DeviceRecord, Fleet, StatusRecord};
use crate::report::{self, Comparison, DeviceReport, Prices, Report};

pub const CSS: &str = include_str!("dashboard.css");

/// Names of [`TIERS`] for people, with their colour classes.
const TIER_NAMES: [(&str, &str); 4] = [
    ("local", "c0"),
    ("escalated (cloud)", "c1"),
    ("escalated, local fallback", "c2"),
    ("refused (overloaded)", "c3"),
];
const PATH_NAMES: [(&str, &str); 3] = [("local", "c0"), ("cloud", "c1"), ("fallback", "c2")];

/// One device's line in the table (and the head of its page).
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub model: Option<String>,
    pub online: Option<bool>,
    pub status_since_ms: Option<u64>,
    pub reason: String,
    pub last_seen_ms: Option<u64>,
    pub threshold: Option<f32>,
    /// Of the latest window that answered anything (an idle window has no rate).
    pub escalation_rate: Option<f64>,
    /// Escalation rates of the history's points, oldest first.
    pub spark: Vec<f64>,
    /// Agreement at the threshold it runs, and its lower bound.
    pub agreement: Option<(f64, f64)>,
    /// p50/p95 µs per [`PATHS`] in the latest window that had such requests.
    pub latency: [Option<(u64, u64)>; 3],
    pub joules_per_inference: Option<f64>,
    pub meter: String,
    pub estimated: bool,
    pub requests: u64,
    pub money_saving_vs_cloud: Option<f64>,
}

impl Row {
    fn build(
        id: &str,
        rec: Option<&DeviceRecord>,
        status: Option<&StatusRecord>,
        hist: Option<&DeviceHistory>,
        rep: Option<&DeviceReport>,
        now_ms: u64,
    ) -> Row {
        let latest = rec.map(|r| &r.latest);
        Row {
            id: id.to_string(),
            model: latest.map(|r| r.model.clone()),
            online: status.map(|s| s.online),
            status_since_ms: status.map(|s| s.since_ms),
            reason: status.map(|s| s.reason.clone()).unwrap_or_default(),
            last_seen_ms: rec.map(|r| r.last_seen_ms),
            threshold: latest.map(|r| r.threshold),
            escalation_rate: latest.and_then(|r| r.escalation_rate()).or_else(|| {
                hist.and_then(|h| h.points.iter().rev().find_map(|p| p.escalation_rate()))
            }),
            spark: hist
                .map(|h| {
                    h.points
                        .iter()
                        .filter_map(|p| p.escalation_rate())
                        .collect()
                })
                .unwrap_or_default(),
            agreement: rec
                .and_then(|r| agreement_point(r, now_ms))
                .map(|a| (a.agreement, a.lower_bound)),
            latency: std::array::from_fn(|i| {
                latest
                    .and_then(|r| r.latency(PATHS[i]))
                    .filter(|l| l.count > 0)
                    .map(|l| (l.p50_us, l.p95_us))
                    .or_else(|| {
                        let h = hist?;
                        let (p50, p95) = h.points.iter().rev().find_map(|p| p.latency_us[i])?;
                        Some((u64::from(p50), u64::from(p95)))
                    })
            }),
            joules_per_inference: rec.and_then(|r| r.energy_rates.joules_per_inference),
            meter: latest.map(|r| r.energy.meter.clone()).unwrap_or_default(),
            estimated: latest.is_some_and(|r| r.energy.estimated),
            requests: latest.map_or(0, |r| r.totals.answered()),
            money_saving_vs_cloud: rep.and_then(|d| d.comparison.money_saving_vs_all_cloud_pct),
        }
    }
}

/// The fleet page's snapshot.
#[derive(Debug)]
pub struct Overview {
    pub now_ms: u64,
    pub devices: usize,
    pub online: usize,
    pub offline: usize,
    pub rows: Vec<Row>,
    pub report: Report,
    pub span: (u64, u64),
    pub buckets: Vec<history::Bucket>,
    /// Latest tuner pushes of any device: (device, push).
    pub pushes: Vec<(String, Push)>,
    /// Escalated share of the answered requests in the devices' latest windows.
    pub escalation_now: Option<f64>,
    pub tracked: usize,
    pub untracked: u64,
    pub limits: history::Limits,
}

/// The plots span at least this long (ms), ending now.
const MIN_SPAN_MS: u64 = 10_000;

/// A span of at least [`MIN_SPAN_MS`] ending now, from the earliest point held.
fn span_of(h: &history::History, now_ms: u64) -> (u64, u64) {
    let from = history::earliest(h)
        .unwrap_or(now_ms)
        .min(now_ms.saturating_sub(MIN_SPAN_MS));
    (from, now_ms.max(from + 1))
}

impl Overview {
    pub fn build(f: &Fleet, prices: &Prices, delta: f64, now_ms: u64) -> Overview {
        let report = report::build(&usages(f, delta), prices);
        let h = f.history();
        // The report lists the devices in the fleet's order, so the i-th row is the i-th.
        let rows = f
            .devices()
            .take(MAX_ROWS)
            .zip(&report.devices)
            .map(|(rec, rep)| {
                let id = rec.device_id.as_str();
                Row::build(id, Some(rec), f.status(id), h.get(id), Some(rep), now_ms)
            })
            .collect();
        let (online, offline) = f.statuses().fold((0, 0), |(on, off), (_, s)| {
            if s.online {
                (on + 1, off)
            } else {
                (on, off + 1)
            }
        });
        let span = span_of(h, now_ms);
        let mut pushes: Vec<(String, Push)> = h
            .iter()
            .flat_map(|(id, d)| d.pushes.iter().map(move |p| (id.clone(), p.clone())))
            .filter(|(_, p)| p.t_ms >= span.0)
            .collect();
        pushes.sort_by_key(|(_, p)| p.t_ms);
        let skip = pushes.len().saturating_sub(MAX_FLEET_MARKERS);
        pushes.drain(..skip);
        let window = f
            .devices()
            .fold(tierd_protocol::TierCounts::default(), |acc, d| {
                acc.plus(d.latest.window)
            });
        Overview {
            now_ms,
            devices: f.len(),
            online,
            offline,
            rows,
            span,
            buckets: history::fleet_buckets(h, span.0, span.1, FLEET_BUCKETS),
            pushes,
            escalation_now: (window.answered() > 0)
                .then(|| window.escalated() as f64 / window.answered() as f64),
            tracked: h.len(),
            untracked: h.untracked,
            limits: h.limits(),
            report,
        }
    }
}

/// One device's page snapshot.
#[derive(Debug)]
pub struct DeviceView {
    pub now_ms: u64,
    pub row: Row,
    pub boot_id: Option<u64>,
    pub history: Option<DeviceHistory>,
    pub report: Option<DeviceReport>,
    pub currency: String,
    pub target: f64,
    pub untracked: bool,
}

impl DeviceView {
    /// `None` when the fleet knows nothing of the device.
    pub fn build(
        f: &Fleet,
        id: &str,
        prices: &Prices,
        delta: f64,
        target: f64,
        now_ms: u64,
    ) -> Option<DeviceView> {
        let rec = f.get(id);
        let status = f.status(id);
        if rec.is_none() && status.is_none() {
            return None;
        }
        let report = rec.map(|r| report::build(&[report::usage(r, delta)], prices));
        let dev_report = report.and_then(|r| r.devices.into_iter().next());
        let hist = f.history().get(id).cloned();
        Some(DeviceView {
            now_ms,
            row: Row::build(id, rec, status, hist.as_ref(), dev_report.as_ref(), now_ms),
            boot_id: rec.map(|r| r.boot_id),
            untracked: hist.is_none(),
            history: hist,
            report: dev_report,
            currency: prices.currency.clone(),
            target,
        })
    }
}

// ---- formatting ----

fn pct(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or_else(
        || "–".into(),
        |v| format!("{} %", svg::num((v * 1000.0).round() / 10.0)),
    )
}

fn saving(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or_else(
        || "–".into(),
        |v| format!("{} %", svg::num((v * 10.0).round() / 10.0)),
    )
}

fn ms(us: u64) -> String {
    sig(us as f64 / 1000.0)
}

/// Joules in the unit that reads best.
fn joules(j: f64) -> String {
    if !j.is_finite() {
        return "–".into();
    }
    let a = j.abs();
    if a >= 1000.0 {
        format!("{} kJ", sig(j / 1000.0))
    } else if a >= 1.0 || a == 0.0 {
        format!("{} J", sig(j))
    } else if a >= 1e-3 {
        format!("{} mJ", sig(j * 1e3))
    } else {
        format!("{} µJ", sig(j * 1e6))
    }
}

/// Three significant digits.
fn sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return svg::num(v);
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn money(v: f64, currency: &str) -> String {
    format!("{} {}", sig(v), esc(currency))
}

fn grams(g: f64) -> String {
    if g.abs() >= 1000.0 {
        format!("{} kg", sig(g / 1000.0))
    } else {
        format!("{} g", sig(g))
    }
}

fn ago(now_ms: u64, t_ms: u64) -> String {
    let s = now_ms.saturating_sub(t_ms) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// `id` as one path segment of a URL (everything but unreserved characters escaped).
fn segment(id: &str) -> String {
    let mut out = String::new();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn online_badge(online: Option<bool>) -> &'static str {
    match online {
        Some(true) => "<span class=\"badge on\">online</span>",
        Some(false) => "<span class=\"badge off\">offline</span>",
        None => "<span class=\"badge unknown\">no status</span>",
    }
}

fn head(out: &mut String, title: &str, refresh: bool) {
    let refresh = if refresh {
        format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">")
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
         <title>{}</title><link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"/dashboard.css\"></head><body>",
        esc(title)
    );
}

fn top_bar(out: &mut String, now_ms: u64, crumbs: &str) {
    let _ = write!(
        out,
        "<header><h1><a href=\"/\">tierd fleet</a>{crumbs}</h1>\
         <span class=\"muted\">relay time {} UTC · reloads every {REFRESH_S} s</span>\
         <form method=\"post\" action=\"/logout\"><button type=\"submit\">Log out</button></form></header><main>",
        svg::clock(now_ms as f64, true)
    );
}

fn card(out: &mut String, label: &str, value: &str, sub: &str) {
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"label\">{label}</div><div class=\"value\">{value}</div>\
         <div class=\"sub\">{sub}</div></div>"
    );
}

fn notes(out: &mut String, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    out.push_str("<details class=\"notes\"><summary>Notes on the figures</summary><ul>");
    for n in notes {
        let _ = write!(out, "<li>{}</li>", esc(n));
    }
    out.push_str("</ul></details>");
}

/// Money and CO₂ against all-cloud (and energy), from the cost report's comparison.
fn savings_cards(out: &mut String, c: &Comparison, currency: &str) {
    card(
        out,
        "Cost saved vs all-cloud",
        &saving(c.money_saving_vs_all_cloud_pct),
        &format!(
            "tierd {} · all-cloud {}",
            money(c.tierd.money, currency),
            money(c.all_cloud.money, currency)
        ),
    );
    card(
        out,
        "CO₂ saved vs all-cloud",
        &saving(c.co2_saving_vs_all_cloud_pct),
        &format!(
            "tierd {} · all-cloud {}",
            grams(c.tierd.g_co2),
            grams(c.all_cloud.g_co2)
        ),
    );
    card(
        out,
        "Cloud calls",
        &svg::num(c.tierd.cloud_calls),
        &format!("all-cloud {}", svg::num(c.all_cloud.cloud_calls)),
    );
}

// ---- the fleet page ----

pub fn overview(v: &Overview) -> String {
    let mut out = String::new();
    head(&mut out, "tierd fleet", true);
    top_bar(&mut out, v.now_ms, "");
    out.push_str("<section class=\"cards\">");
    card(
        &mut out,
        "Devices",
        &v.devices.to_string(),
        &format!("{} online · {} offline", v.online, v.offline),
    );
    let r = &v.report;
    card(
        &mut out,
        "Requests",
        &r.fleet_requests.to_string(),
        &format!(
            "escalated {} overall · {} in the latest windows",
            pct((r.fleet_requests > 0)
                .then(|| r.fleet_escalations as f64 / r.fleet_requests as f64)),
            pct(v.escalation_now)
        ),
    );
    savings_cards(&mut out, &r.fleet, &r.prices.currency);
    out.push_str("</section><section class=\"plots\">");
    let bars: Vec<((f64, f64), Vec<f64>)> = v
        .buckets
        .windows(2)
        .map(|w| (w[0].t_ms, w[1].t_ms))
        .chain(v.buckets.last().map(|b| (b.t_ms, v.span.1)))
        .zip(&v.buckets)
        .map(|((a, b), bucket)| {
            (
                (a as f64, b as f64),
                bucket.tiers.iter().map(|&n| n as f64).collect(),
            )
        })
        .collect();
    let x_range = Some((v.span.0 as f64, v.span.1 as f64));
    out.push_str(&svg::stacked_bars(&Stacked {
        title: "Fleet requests by tier".into(),
        unit: "requests".into(),
        categories: TIER_NAMES
            .iter()
            .map(|(n, c)| (n.to_string(), *c))
            .collect(),
        bars,
        x_range,
    }));
    let rate: Vec<(f64, f64)> = v
        .buckets
        .iter()
        .filter_map(|b| b.escalation_rate().map(|r| (b.t_ms as f64, r)))
        .collect();
    out.push_str(&svg::line_chart(&Chart {
        title: "Fleet escalation rate, tuner pushes marked".into(),
        unit: "%".into(),
        series: vec![Series::new("escalated share", "c1", rate)],
        markers: v
            .pushes
            .iter()
            .map(|(id, p)| Marker {
                x: p.t_ms as f64,
                label: format!(
                    "{id}: threshold {} pushed ({})",
                    svg::num(f64::from(p.threshold)),
                    p.why
                ),
            })
            .collect(),
        y_min: Some(0.0),
        y_max: Some(1.0),
        x_range,
        y_label_scale: 100.0,
        ..Chart::default()
    }));
    out.push_str("</section>");
    device_table(&mut out, v);
    notes(&mut out, &v.report.notes);
    let _ = write!(
        out,
        "<footer>History: {} devices tracked (at most {}, {} points each; {} refused), kept in \
         memory only: it starts empty when the relay restarts. Full data: \
         <a href=\"/api/devices\">/api/devices</a>, <a href=\"/api/report\">/api/report</a>, \
         <a href=\"/metrics\">/metrics</a>.</footer></main></body></html>",
        v.tracked, v.limits.max_devices, v.limits.max_points, v.untracked
    );
    out
}

fn device_table(out: &mut String, v: &Overview) {
    out.push_str(
        "<section><h2>Devices</h2><table class=\"devices\"><thead><tr><th>device</th><th>state</th>\
         <th>model</th><th>threshold</th><th>escalated</th><th>trend</th><th>agreement (bound)</th>\
         <th>p50/p95 local</th><th>p50/p95 cloud</th><th>energy / inference, meter</th>\
         <th>saved vs cloud</th></tr></thead><tbody>",
    );
    if v.rows.is_empty() {
        out.push_str(
            "<tr><td colspan=\"11\" class=\"muted\">No device has reported telemetry yet.</td></tr>",
        );
    }
    for r in &v.rows {
        let lat = |i: usize| {
            r.latency[i].map_or_else(
                || "–".into(),
                |(p50, p95)| format!("{} / {} ms", ms(p50), ms(p95)),
            )
        };
        let _ = write!(
            out,
            "<tr class=\"device\" data-device=\"{id}\"><td><a href=\"/devices/{seg}\">{id}</a></td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} · {}</td>\
             <td>{}</td></tr>",
            online_badge(r.online),
            esc(r.model.as_deref().unwrap_or("–")),
            r.threshold.map_or("–".into(), |t| svg::num(f64::from(t))),
            pct(r.escalation_rate),
            svg::sparkline(&r.spark, Some(1.0)),
            r.agreement
                .map_or("–".into(), |(a, lb)| format!("{} ({})", pct(Some(a)), pct(Some(lb)))),
            lat(0),
            lat(1),
            r.joules_per_inference.map_or("–".into(), joules),
            meter(r),
            saving(r.money_saving_vs_cloud),
            id = esc(&r.id),
            seg = esc(&segment(&r.id)),
        );
    }
    out.push_str("</tbody></table>");
    if v.devices > v.rows.len() {
        let _ = write!(
            out,
            "<p class=\"muted\">{} more devices not listed (the first {MAX_ROWS} by id are); \
             all are in <a href=\"/api/devices\">/api/devices</a>.</p>",
            v.devices - v.rows.len()
        );
    }
    out.push_str("</section>");
}

fn meter(r: &Row) -> String {
    if r.meter.is_empty() {
        return "–".into();
    }
    let est = if r.estimated {
        " <span class=\"muted\" title=\"estimated from CPU time, not metered\">(est.)</span>"
    } else {
        ""
    };
    format!("{}{est}", esc(&r.meter))
}

// ---- one device ----

pub fn device(v: &DeviceView) -> String {
    let r = &v.row;
    let mut out = String::new();
    head(&mut out, &format!("{} · tierd fleet", r.id), true);
    top_bar(
        &mut out,
        v.now_ms,
        &format!(" / <span class=\"id\">{}</span>", esc(&r.id)),
    );
    out.push_str("<section class=\"cards\">");
    let since = r
        .status_since_ms
        .map_or(String::new(), |t| format!("since {}", ago(v.now_ms, t)));
    let reason = if r.reason.is_empty() {
        String::new()
    } else {
        format!(" · {}", esc(&r.reason))
    };
    card(
        &mut out,
        "State",
        online_badge(r.online),
        &format!("{since}{reason}"),
    );
    card(
        &mut out,
        "Model",
        &esc(r.model.as_deref().unwrap_or("–")),
        &format!(
            "threshold {} · boot {}",
            r.threshold.map_or("–".into(), |t| svg::num(f64::from(t))),
            v.boot_id.map_or("–".into(), |b| b.to_string())
        ),
    );
    card(
        &mut out,
        "Escalated",
        &pct(r.escalation_rate),
        &format!(
            "latest window with traffic · {} requests since start · last report {}",
            r.requests,
            r.last_seen_ms.map_or("never".into(), |t| ago(v.now_ms, t))
        ),
    );
    card(
        &mut out,
        "Agreement with the cloud",
        &r.agreement.map_or("–".into(), |(a, _)| pct(Some(a))),
        &format!(
            "lower bound {} · target {}",
            r.agreement.map_or("–".into(), |(_, lb)| pct(Some(lb))),
            pct(Some(v.target))
        ),
    );
    card(
        &mut out,
        "Energy / local inference",
        &r.joules_per_inference.map_or("–".into(), joules),
        &format!("meter {}", meter(r)),
    );
    if let Some(rep) = &v.report {
        savings_cards(&mut out, &rep.comparison, &v.currency);
    }
    out.push_str("</section><section class=\"plots\">");
    let empty = DeviceHistory::default();
    let h = v.history.as_ref().unwrap_or(&empty);
    device_plots(&mut out, h, v);
    out.push_str("</section>");
    if v.untracked {
        out.push_str(
            "<p class=\"muted\">This device has no history: the relay keeps it for a limited \
             number of devices (see the fleet page's footer).</p>",
        );
    }
    if let Some(rep) = &v.report {
        cost_table(&mut out, &rep.comparison, &v.currency);
        notes(&mut out, &rep.notes);
    }
    status_list(&mut out, h, v.now_ms);
    let _ = write!(
        out,
        "<footer>Raw: <a href=\"/api/devices/{seg}\">/api/devices/{id}</a> · \
         <a href=\"/api/devices/{seg}/config\">config</a></footer></main></body></html>",
        seg = esc(&segment(&r.id)),
        id = esc(&r.id)
    );
    out
}

fn device_plots(out: &mut String, h: &DeviceHistory, v: &DeviceView) {
    let t = |p: &history::Point| p.t_ms as f64;
    let first = h.points.front().map_or(v.now_ms, |p| p.t_ms);
    let x_range = Some((
        first.min(v.now_ms.saturating_sub(MIN_SPAN_MS)) as f64,
        v.now_ms as f64,
    ));
    let pushes: Vec<Marker> = h
        .pushes
        .iter()
        .map(|p| Marker {
            x: p.t_ms as f64,
            label: format!(
                "threshold {} pushed ({})",
                svg::num(f64::from(p.threshold)),
                p.why
            ),
        })
        .collect();
    let rate: Vec<(f64, f64)> = h
        .points
        .iter()
        .filter_map(|p| p.escalation_rate().map(|r| (t(p), r)))
        .collect();
    let threshold: Vec<(f64, f64)> = h
        .points
        .iter()
        .map(|p| (t(p), f64::from(p.threshold)))
        .collect();
    let top = threshold.iter().map(|p| p.1).fold(1.0, f64::max);
    out.push_str(&svg::line_chart(&Chart {
        title: "Escalation rate and threshold, tuner pushes marked".into(),
        series: vec![
            Series::new("escalated share", "c1", rate),
            Series::new("threshold", "c4", threshold).step(),
        ],
        markers: pushes.clone(),
        y_min: Some(0.0),
        y_max: Some(top),
        x_range,
        ..Chart::default()
    }));
    let mut prev: Option<u64> = None;
    let bars = h
        .points
        .iter()
        .map(|p| {
            let start = prev.unwrap_or_else(|| p.t_ms.saturating_sub(1000));
            prev = Some(p.t_ms);
            (
                (start as f64, p.t_ms as f64),
                p.tiers.iter().map(|&n| f64::from(n)).collect(),
            )
        })
        .collect();
    debug_assert_eq!(TIERS.len(), TIER_NAMES.len());
    out.push_str(&svg::stacked_bars(&Stacked {
        title: "Requests by tier per telemetry window".into(),
        unit: "requests".into(),
        categories: TIER_NAMES
            .iter()
            .map(|(n, c)| (n.to_string(), *c))
            .collect(),
        bars,
        x_range,
    }));
    let at = |f: fn(&history::AgreementPoint) -> f64| -> Vec<(f64, f64)> {
        h.agreement.iter().map(|a| (a.t_ms as f64, f(a))).collect()
    };
    let certified: Vec<(f64, f64)> = h
        .agreement
        .iter()
        .filter(|a| !a.insufficient_evidence)
        .map(|a| (a.t_ms as f64, a.certified_bound))
        .collect();
    let lowest = h
        .agreement
        .iter()
        .map(|a| a.lower_bound.min(a.certified_bound))
        .fold(v.target, f64::min);
    out.push_str(&svg::line_chart(&Chart {
        title: "Agreement with the cloud at the running threshold".into(),
        unit: "%".into(),
        series: vec![
            Series::new("estimate", "c0", at(|a| a.agreement)),
            Series::new("lower bound", "c0", at(|a| a.lower_bound)).dashed(),
            Series::new("bound certified at the tuned threshold", "c4", certified).dashed(),
        ],
        markers: pushes,
        hlines: vec![HLine {
            y: v.target,
            label: format!("target {}", pct(Some(v.target))),
        }],
        y_min: Some((lowest - 0.02).clamp(0.0, 1.0)),
        y_max: Some(1.0),
        x_range,
        y_label_scale: 100.0,
        ..Chart::default()
    }));
    let mut lat = Vec::new();
    for (i, &(name, class)) in PATH_NAMES.iter().enumerate() {
        let q = |which: usize| -> Vec<(f64, f64)> {
            h.points
                .iter()
                .filter_map(|p| {
                    p.latency_us[i].map(|(p50, p95)| {
                        let us = if which == 0 { p50 } else { p95 };
                        (t(p), f64::from(us) / 1000.0)
                    })
                })
                .collect()
        };
        let (p50, p95) = (q(0), q(1));
        if !p50.is_empty() {
            lat.push(Series::new(&format!("{name} p50"), class, p50));
            lat.push(Series::new(&format!("{name} p95"), class, p95).dashed());
        }
    }
    out.push_str(&svg::line_chart(&Chart {
        title: "Latency per path".into(),
        unit: "ms".into(),
        series: lat,
        from_zero: true,
        x_range,
        ..Chart::default()
    }));
    let energy: Vec<(f64, f64)> = h
        .points
        .iter()
        .filter_map(|p| {
            p.joules_per_inference
                .map(|j| (t(p), f64::from(j) * 1000.0))
        })
        .collect();
    let meter = if h.meter.is_empty() {
        String::new()
    } else {
        format!(
            ", meter {}{}",
            h.meter,
            if h.estimated { " (estimated)" } else { "" }
        )
    };
    out.push_str(&svg::line_chart(&Chart {
        title: format!("Energy per local inference{meter}"),
        unit: "mJ".into(),
        series: vec![Series::new("local compute", "c0", energy)],
        from_zero: true,
        x_range,
        ..Chart::default()
    }));
}

fn cost_table(out: &mut String, c: &Comparison, currency: &str) {
    out.push_str(
        "<section><h2>The same traffic three ways</h2><table class=\"cost\"><thead><tr><th></th>\
         <th>cloud calls</th><th>device energy</th><th>disagreements</th><th>money</th><th>CO₂</th>\
         </tr></thead><tbody>",
    );
    for (name, s) in [
        ("tierd (measured)", &c.tierd),
        ("all-cloud", &c.all_cloud),
        ("all-edge", &c.all_edge),
    ] {
        let _ = write!(
            out,
            "<tr><th>{name}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            svg::num(s.cloud_calls),
            joules(s.energy_joules),
            s.disagreements.map_or("–".into(), sig),
            money(s.money, currency),
            grams(s.g_co2)
        );
    }
    let _ = write!(
        out,
        "</tbody></table><p class=\"muted\">Saved vs all-cloud: money {}, CO₂ {} · vs all-edge: \
         money {}, CO₂ {} (figures of <a href=\"/api/report\">/api/report</a>).</p></section>",
        saving(c.money_saving_vs_all_cloud_pct),
        saving(c.co2_saving_vs_all_cloud_pct),
        saving(c.money_saving_vs_all_edge_pct),
        saving(c.co2_saving_vs_all_edge_pct)
    );
}

fn status_list(out: &mut String, h: &DeviceHistory, now_ms: u64) {
    if h.status.is_empty() {
        return;
    }
    out.push_str("<section><h2>Online / offline</h2><ul class=\"status\">");
    for s in h.status.iter().rev().take(10) {
        let _ = write!(
            out,
            "<li>{} at {} UTC ({})</li>",
            online_badge(Some(s.online)),
            svg::clock(s.t_ms as f64, true),
            ago(now_ms, s.t_ms)
        );
    }
    out.push_str("</ul></section>");
}

// ---- login and messages ----

pub fn login(error: Option<&str>) -> String {
    let mut out = String::new();
    head(&mut out, "tierd fleet: log in", false);
    let error = error.map_or(String::new(), |e| {
        format!("<p class=\"error\">{}</p>", esc(e))
    });
    let _ = write!(
        out,
        "<main class=\"login\"><h1>tierd fleet</h1>{error}\
         <form method=\"post\" action=\"/login\"><label for=\"token\">Relay API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"muted\">The token is in <code>http.token_file</code>, or in the relay's state \
         directory (<code>http-token</code>). Logging in sets an HttpOnly, SameSite=Strict \
         session cookie for 12 hours that allows reading only.</p></main></body></html>"
    );
    out
}

pub fn message(title: &str, text: &str) -> String {
    let mut out = String::new();
    head(&mut out, title, false);
    let _ = write!(
        out,
        "<main class=\"login\"><h1>{}</h1><p>{text}</p><p><a href=\"/\">The fleet</a></p></main></body></html>",
        esc(title)
    );
    out
}

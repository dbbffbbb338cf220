//! `cloud-relay devices`: the fleet view of `/api/devices` as a fixed-width table. Pure (the
//! JSON and the clock in, text out), so it is tested without a relay; fields missing from the
//! JSON (a device that sent a status but no telemetry yet) show as `-`.

use serde_json::Value;

const HEADER: [&str; 10] = [
    "DEVICE",
    "STATE",
    "MODEL",
    "THRESHOLD",
    "REQUESTS",
    "EDGE",
    "CLOUD",
    "FALLBACK",
    "SEEN",
    "NOTE",
];

/// `ms` ago as `12s`, `5m`, `3h`, `2d`.
fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn pct(part: u64, total: u64) -> String {
    if total == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / total as f64)
    }
}

/// One row per device known by status or telemetry, sorted by id.
pub fn rows(body: &Value, now_ms: u64) -> Vec<[String; 10]> {
    let empty = serde_json::Map::new();
    let status = body["status"].as_object().unwrap_or(&empty);
    let records: std::collections::BTreeMap<&str, &Value> = body["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["device_id"].as_str().map(|id| (id, d)))
                .collect()
        })
        .unwrap_or_default();
    let mut ids: Vec<&str> = status.keys().map(String::as_str).collect();
    ids.extend(records.keys().copied());
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let st = status.get(id);
            let rec = records.get(id);
            let state = match st.map(|s| (s["online"].as_bool(), s["reason"].as_str())) {
                Some((Some(true), _)) => "online".to_string(),
                Some((Some(false), Some(r))) if !r.is_empty() => format!("offline ({r})"),
                Some(_) => "offline".into(),
                None => "-".into(),
            };
            let latest = rec.map(|r| &r["latest"]);
            let model = latest
                .and_then(|l| l["model"].as_str())
                .or_else(|| st.and_then(|s| s["model"]["model"].as_str()))
                .unwrap_or("-")
                .to_string();
            let threshold = latest
                .and_then(|l| l["threshold"].as_f64())
                .map_or("-".into(), |t| format!("{t:.3}"));
            let totals = latest.map(|l| &l["totals"]);
            let n = |k: &str| totals.and_then(|t| t[k].as_u64()).unwrap_or(0);
            let (edge, cloud, fallback) = (n("edge"), n("cloud"), n("edge_fallback"));
            let total = edge + cloud + fallback;
            let seen = rec
                .and_then(|r| r["last_seen_ms"].as_u64())
                .or_else(|| st.and_then(|s| s["since_ms"].as_u64()))
                .map_or("-".into(), |t| ago(now_ms, t));
            let mut notes = Vec::new();
            if let Some(c) = st
                .and_then(|s| s["id_collisions"].as_u64())
                .filter(|c| *c > 0)
            {
                notes.push(format!("{c} id collisions"));
            }
            if let Some(m) = rec
                .and_then(|r| r["missing_reports"].as_u64())
                .filter(|m| *m > 0)
            {
                notes.push(format!("{m} reports missing"));
            }
            [
                id.to_string(),
                state,
                model,
                threshold,
                if rec.is_some() {
                    total.to_string()
                } else {
                    "-".into()
                },
                pct(edge, total),
                pct(cloud, total),
                pct(fallback, total),
                seen,
                notes.join(", "),
            ]
        })
        .collect()
}

/// The table, header first, columns as wide as their widest cell; a line when the fleet is
/// empty.
pub fn render(body: &Value, now_ms: u64) -> String {
    let rows = rows(body, now_ms);
    if rows.is_empty() {
        return "no devices yet (none has sent a status or telemetry to this relay)\n".into();
    }
    let header = HEADER.map(str::to_string);
    let mut width = [0usize; 10];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_device_with_telemetry_and_one_with_only_a_status() {
        let body = json!({
            "devices": [{
                "device_id": "pi-1", "last_seen_ms": 95_000, "missing_reports": 2,
                "latest": {"model": "digits-edge@1", "threshold": 0.8125,
                           "totals": {"edge": 80, "cloud": 15, "edge_fallback": 5}}
            }],
            "status": {
                "pi-1": {"online": true, "reason": "", "since_ms": 1000},
                "pi-2": {"online": false, "reason": "connection lost", "since_ms": 40_000,
                         "id_collisions": 3}
            }
        });
        let text = render(&body, 100_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("DEVICE"));
        assert!(lines[1].starts_with("pi-1") && lines[1].contains("online"));
        for cell in [
            "digits-edge@1",
            "0.812",
            "100",
            "80.0%",
            "15.0%",
            "5.0%",
            "5s",
            "2 reports missing",
        ] {
            assert!(lines[1].contains(cell), "{cell} not in {}", lines[1]);
        }
        assert!(lines[2].contains("offline (connection lost)"));
        assert!(
            lines[2].contains("60s") && lines[2].contains("3 id collisions"),
            "{}",
            lines[2]
        );
        // Columns line up: every cell of a column starts at the same offset.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 6], "online");
    }

    #[test]
    fn an_empty_fleet_says_so() {
        let text = render(&json!({"devices": [], "status": {}}), 0);
        assert!(text.starts_with("no devices yet"));
        assert!(rows(&json!({}), 0).is_empty());
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(10_000, 0), "10s");
        assert_eq!(ago(600_000, 0), "10m");
        assert_eq!(ago(3 * 3_600_000, 0), "3h");
        assert_eq!(ago(5 * 86_400_000, 0), "5d");
        assert_eq!(
            ago(0, 10),
            "0s",
            "a clock behind the relay's is not negative"
        );
    }
}

//! The Grafana dashboard (`cross/grafana/tierd-fleet.json`) and the Prometheus alert rules
//! (`cross/prometheus/tierd-alerts.yml`) name only metrics the daemons really export.
//!
//! A real relay and agent run with traffic flowing (some of it escalated) and short telemetry
//! windows; both `/metrics` are scraped until every metric the two files name has appeared in a
//! scrape (or 40 s pass). The PromQL is read by a small tokenizer ([`promql::metric_names`]);
//! its own test below proves the check fails on a wrong name. The files' structure is checked
//! too (every panel has a datasource and a target; every alert a severity, `summary` and
//! `description`), and `promtool check rules` runs on the rules, and on the dashboard's queries
//! written as rules, when promtool is installed (Debian: `prometheus`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::{
    confident_examples, repo_root, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc,
};
use yaml_rust2::{Yaml, YamlLoader};

const DASHBOARD: &str = "cross/grafana/tierd-fleet.json";
const ALERTS: &str = "cross/prometheus/tierd-alerts.yml";

/// Reading metric names out of PromQL.
mod promql {
    /// Aggregations and binary-operator keywords (PromQL keywords are case-insensitive).
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "and",
        "or",
        "unless",
        "atan2",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    ];
    /// Keywords whose `( … )` is a list of label names.
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];

    fn ident_start(c: u8) -> bool {
        c.is_ascii_alphabetic() || c == b'_' || c == b':'
    }

    fn ident_char(c: u8) -> bool {
        c.is_ascii_alphanumeric() || c == b'_' || c == b':'
    }

    /// Index just past the string literal starting at `i` (a quote, or a backtick with no
    /// escapes).
    fn skip_string(b: &[u8], i: usize) -> Result<usize, String> {
        let quote = b[i];
        let mut j = i + 1;
        while j < b.len() {
            match b[j] {
                b'\\' if quote != b'`' => j += 2,
                c if c == quote => return Ok(j + 1),
                _ => j += 1,
            }
        }
        Err(format!("unterminated string from byte {i}"))
    }

    /// Index just past the bracket `close` matching the `open` at `i`, strings inside skipped.
    fn skip_group(b: &[u8], i: usize, open: u8, close: u8) -> Result<usize, String> {
        let mut depth = 0;
        let mut j = i;
        while j < b.len() {
            match b[j] {
                b'"' | b'\'' | b'`' => {
                    j = skip_string(b, j)?;
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(j + 1);
                    }
                }
                _ => {}
            }
            j += 1;
        }
        Err(format!(
            "unbalanced {:?} from byte {i}",
            char::from(open).to_string()
        ))
    }

    fn next_non_space(b: &[u8], mut i: usize) -> Option<(usize, u8)> {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        b.get(i).map(|&c| (i, c))
    }

    /// The metric names `expr` selects, in order of appearance, duplicates kept. Skipped:
    /// label matchers (`{…}`), ranges and subqueries (`[…]`), label lists after `by`,
    /// `without`, `on`, `ignoring`, `group_left`, `group_right`, function names (an identifier
    /// before `(`), keywords, numbers and durations, string literals, comments, and Grafana
    /// variables (`$x`, `${x}`).
    pub fn metric_names(expr: &str) -> Result<Vec<String>, String> {
        let b = expr.as_bytes();
        let mut names = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'#' {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            } else if c == b'"' || c == b'\'' || c == b'`' {
                i = skip_string(b, i)?;
            } else if c == b'{' {
                i = skip_group(b, i, b'{', b'}')?;
            } else if c == b'[' {
                i = skip_group(b, i, b'[', b']')?;
            } else if c == b'}' || c == b']' {
                return Err(format!("unbalanced {:?} at byte {i}", char::from(c)));
            } else if c == b'$' {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = skip_group(b, i, b'{', b'}')?;
                } else {
                    while i < b.len() && ident_char(b[i]) {
                        i += 1;
                    }
                }
            } else if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
            {
                // 0.95, 1e-3, 0x1f, 5m, 1h30m
                while i < b.len() {
                    let d = b[i];
                    let exponent_sign = (d == b'-' || d == b'+')
                        && matches!(b[i - 1], b'e' | b'E')
                        && b.get(i + 1).is_some_and(u8::is_ascii_digit);
                    if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
            } else if ident_start(c) {
                let start = i;
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let lower = word.to_ascii_lowercase();
                let next = next_non_space(b, i);
                if LABEL_LISTS.contains(&lower.as_str()) {
                    if let Some((j, b'(')) = next {
                        i = skip_group(b, j, b'(', b')')?;
                    }
                } else if KEYWORDS.contains(&lower.as_str()) || matches!(next, Some((_, b'('))) {
                    // a keyword, or a function's name
                } else {
                    names.push(word.to_string());
                }
            } else {
                i += 1;
            }
        }
        Ok(names)
    }

    /// The PromQL inside a Grafana templating query: `label_values(expr, label)` gives
    /// `expr`; `query_result(expr)` gives `expr`; `label_values(label)`, `label_names()` and
    /// `metrics(regex)` name no metric; anything else is PromQL itself.
    pub fn templating_expr(query: &str) -> Option<String> {
        let q = query.trim();
        let inner = |prefix: &str| {
            q.strip_prefix(prefix)
                .and_then(|r| r.trim_start().strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
        };
        if let Some(args) = inner("label_values") {
            // The last top-level comma separates the label name.
            let b = args.as_bytes();
            let (mut depth, mut last_comma, mut i) = (0i32, None, 0);
            while i < b.len() {
                match b[i] {
                    b'"' | b'\'' | b'`' => {
                        i = skip_string(b, i).unwrap_or(b.len());
                        continue;
                    }
                    b'(' | b'{' | b'[' => depth += 1,
                    b')' | b'}' | b']' => depth -= 1,
                    b',' if depth == 0 => last_comma = Some(i),
                    _ => {}
                }
                i += 1;
            }
            return last_comma.map(|c| args[..c].to_string());
        }
        if let Some(expr) = inner("query_result") {
            return Some(expr.to_string());
        }
        if inner("label_names").is_some() || inner("metrics").is_some() {
            return None;
        }
        Some(q.to_string())
    }

    /// What a scrape exposes: each sample name (`x_total`, `x_bucket`, …) and the family
    /// (`# TYPE`) it belongs to.
    #[derive(Debug, Default)]
    pub struct Exposition {
        pub samples: std::collections::BTreeMap<String, String>,
    }

    impl Exposition {
        /// Adds the samples of one scrape (Prometheus text format).
        pub fn add(&mut self, text: &str) {
            let mut family = String::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    family = rest.split_whitespace().next().unwrap_or("").to_string();
                    continue;
                }
                if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                }
                let name = line
                    .split(|c: char| c == '{' || c.is_whitespace())
                    .next()
                    .unwrap_or("");
                let fam = if name.starts_with(family.as_str()) && !family.is_empty() {
                    family.clone()
                } else {
                    name.to_string()
                };
                self.samples.insert(name.to_string(), fam);
            }
        }

        /// The family `name` is a sample of (`tierd_latency_seconds_bucket` →
        /// `tierd_latency_seconds`, `tierd_requests_total` → `tierd_requests`), if scraped.
        pub fn family_of(&self, name: &str) -> Option<&str> {
            self.samples.get(name).map(String::as_str)
        }

        /// Why `name` is not a scraped sample, with the nearest real names.
        pub fn explain_missing(&self, name: &str) -> String {
            let stem = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            let same_family: Vec<&str> = self
                .samples
                .iter()
                .filter(|(_, f)| f.as_str() == stem || f.as_str() == name)
                .map(|(s, _)| s.as_str())
                .collect();
            if !same_family.is_empty() {
                return format!("family exported, but its samples are {same_family:?}");
            }
            let common = |s: &str| {
                s.bytes()
                    .zip(name.bytes())
                    .take_while(|(a, b)| a == b)
                    .count()
            };
            let best = self.samples.keys().map(|s| common(s)).max().unwrap_or(0);
            let near: Vec<&str> = self
                .samples
                .keys()
                .filter(|s| common(s) == best)
                .map(String::as_str)
                .take(4)
                .collect();
            format!("not exported by the relay or the agent; nearest: {near:?}")
        }
    }

    /// Every (where, name) in `exprs` that `scraped` lacks, one line each.
    pub fn missing(exprs: &[(String, String)], scraped: &Exposition) -> Vec<String> {
        let mut out = Vec::new();
        for (where_, expr) in exprs {
            match metric_names(expr) {
                Ok(names) => {
                    for n in names {
                        if scraped.family_of(&n).is_none() {
                            out.push(format!("{where_}: `{n}`: {}", scraped.explain_missing(&n)));
                        }
                    }
                }
                Err(e) => out.push(format!("{where_}: cannot read `{expr}`: {e}")),
            }
        }
        out
    }
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// The dashboard's PromQL, each with where it is, after checking its structure: Grafana's
/// import format (a `DS_PROMETHEUS` input), the device/group/model variables, and every panel
/// but rows with a Prometheus datasource and at least one non-empty target.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    let inputs = dash["__inputs"].as_array().cloned().unwrap_or_default();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "the dashboard needs a DS_PROMETHEUS datasource input: {inputs:?}"
    );
    assert!(dash["schemaVersion"].as_u64() >= Some(36), "Grafana 10+");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let ds_ok = |ds: &Value| ds["type"] == "prometheus" && ds["uid"] == "${DS_PROMETHEUS}";

    let mut exprs = Vec::new();
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        if !ids.insert(p["id"].as_u64()) {
            problems.push(format!("panel {title:?}: id {} used twice", p["id"]));
        }
        if p["gridPos"]["w"].as_u64().is_none() {
            problems.push(format!("panel {title:?}: no gridPos"));
        }
        if p["type"] == "row" {
            if p.get("targets").is_some() {
                problems.push(format!("row {title:?} has targets"));
            }
            continue;
        }
        if !ds_ok(&p["datasource"]) {
            problems.push(format!(
                "panel {title:?}: datasource {} is not the DS_PROMETHEUS input",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title:?}: no targets"));
        }
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or("");
            if expr.trim().is_empty() {
                problems.push(format!(
                    "panel {title:?}: target {} has no expr",
                    t["refId"]
                ));
            }
            if t.get("datasource").is_some() && !ds_ok(&t["datasource"]) {
                problems.push(format!(
                    "panel {title:?}: target datasource {}",
                    t["datasource"]
                ));
            }
            exprs.push((
                format!("panel {title:?} target {}", t["refId"]),
                expr.to_string(),
            ));
        }
    }
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for want in ["device", "group", "model"] {
        if !vars.iter().any(|v| v["name"] == want) {
            problems.push(format!("no templating variable {want:?}"));
        }
    }
    for v in &vars {
        let name = v["name"].as_str().unwrap_or("?");
        if v["type"] != "query" {
            continue;
        }
        if !ds_ok(&v["datasource"]) {
            problems.push(format!("variable {name}: datasource {}", v["datasource"]));
        }
        // Grafana 10 stores the query as an object; older exports as a string.
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or("");
        match promql::templating_expr(q) {
            Some(expr) => exprs.push((format!("variable {name}"), expr)),
            None => problems.push(format!("variable {name}: {q:?} names no metric")),
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}",
        problems.join("\n  ")
    );
    exprs
}

/// The rules' PromQL, each with its alert or record name, after checking each alert has a
/// severity of critical/warning/info and a `summary` and `description`.
fn alert_exprs(docs: &[Yaml]) -> Vec<(String, String)> {
    assert_eq!(docs.len(), 1, "{ALERTS}: one YAML document");
    let groups = docs[0]["groups"].as_vec().cloned().unwrap_or_default();
    assert!(!groups.is_empty(), "{ALERTS}: no groups");
    let mut exprs = Vec::new();
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for g in &groups {
        let group = g["name"].as_str().unwrap_or("?");
        let rules = g["rules"].as_vec().cloned().unwrap_or_default();
        if rules.is_empty() {
            problems.push(format!("group {group}: no rules"));
        }
        for r in &rules {
            let Some(name) = r["alert"].as_str().or_else(|| r["record"].as_str()) else {
                problems.push(format!(
                    "group {group}: a rule with neither alert nor record"
                ));
                continue;
            };
            let expr = r["expr"].as_str().unwrap_or("");
            if expr.trim().is_empty() {
                problems.push(format!("{name}: no expr"));
            }
            exprs.push((format!("rule {name}"), expr.to_string()));
            if r["alert"].is_badvalue() {
                continue;
            }
            if !names.insert(name.to_string()) {
                problems.push(format!("alert {name} defined twice"));
            }
            let severity = r["labels"]["severity"].as_str().unwrap_or("");
            if !["critical", "warning", "info"].contains(&severity) {
                problems.push(format!("{name}: severity {severity:?}"));
            }
            for key in ["summary", "description"] {
                if r["annotations"][key]
                    .as_str()
                    .is_none_or(|s| s.trim().is_empty())
                {
                    problems.push(format!("{name}: no annotations.{key}"));
                }
            }
            if let Some(f) = r["for"].as_str() {
                if promql::metric_names(f)
                    .map(|n| !n.is_empty())
                    .unwrap_or(true)
                {
                    problems.push(format!("{name}: `for: {f}` is not a duration"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{ALERTS}:\n  {}",
        problems.join("\n  ")
    );
    exprs
}

/// `promtool check rules` on the rules, and on the dashboard's queries with Grafana's
/// variables filled in, when promtool is installed.
fn promtool_checks(dash_exprs: &[(String, String)]) {
    let promtool = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    let Some(promtool) = promtool else {
        eprintln!("promtool not installed (Debian: apt-get install prometheus): skipping `promtool check rules`");
        return;
    };
    let check = |file: &Path, what: &str| {
        let out = std::process::Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(file)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool check rules on {what}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    check(&repo_root().join(ALERTS), ALERTS);

    // The dashboard's queries as recording rules: promtool parses each one.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dash_exprs.iter().enumerate() {
        let filled = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$group", ".*")
            .replace("$model", ".*")
            .replace("$device", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&filled).expect("a string")
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).expect("write the dashboard's queries");
    check(&file, "the dashboard's queries");
}

async fn scrape(client: &reqwest::Client, url: &str, token: Option<&str>) -> String {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "GET {url}");
    resp.text().await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_names_an_exported_metric() {
    let started = Instant::now();
    let dash: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let docs = YamlLoader::load_from_str(&read(ALERTS))
        .unwrap_or_else(|e| panic!("{ALERTS} is not YAML: {e}"));
    let dash_exprs = dashboard_exprs(&dash);
    let rule_exprs = alert_exprs(&docs);
    promtool_checks(&dash_exprs);
    let all: Vec<(String, String)> = dash_exprs.iter().chain(&rule_exprs).cloned().collect();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for (where_, expr) in &all {
        let names = promql::metric_names(expr).unwrap_or_else(|e| panic!("{where_}: {e}"));
        assert!(!names.is_empty(), "{where_} names no metric: {expr}");
        wanted.extend(names);
    }

    // A relay with a device group, an agent in it reporting every 0.3 s and auditing every
    // local answer (so the tuner has evidence and a certificate to export).
    let device = "obs-e2e-1";
    let relay = RelayProc::start_with(
        "obs-relay",
        RelayBroker::Embedded,
        "[metrics.groups]\nlab = [\"obs-*\"]\n",
    )
    .await;
    let agent = Arc::new(
        AgentProc::start(
            AgentOptions::new(device, relay.broker_port)
                .telemetry_interval_s(0.3)
                .audit_rate(1.0),
        )
        .await,
    );

    // Traffic keeps flowing while scraping: the per-window series (escalation ratio, latency
    // quantiles, joules per request) exist only for windows that answered requests.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move {
            let (unsure, confident) = (unsure_examples(), confident_examples());
            let mut by_tier: BTreeMap<String, u64> = BTreeMap::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let ex = if i.is_multiple_of(3) {
                    &unsure[i % unsure.len()]
                } else {
                    &confident[i % confident.len()]
                };
                let r = agent.infer(&ex.pixels).await;
                assert_eq!(r.status, 200, "{}", r.body);
                *by_tier.entry(r.tier().to_string()).or_default() += 1;
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            by_tier
        })
    };

    let client = tierd_e2e::http_client();
    let mut scraped = promql::Exposition::default();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut scrapes = 0;
    loop {
        scraped.add(&scrape(&client, &relay.url("/metrics"), Some(&relay.token)).await);
        scraped.add(&scrape(&client, &agent.url("/metrics"), None).await);
        scrapes += 1;
        let done = wanted.iter().all(|n| scraped.family_of(n).is_some());
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let by_tier = traffic.await.expect("traffic task");
    assert!(
        by_tier.get("cloud").copied().unwrap_or(0) > 0
            && by_tier.get("edge").copied().unwrap_or(0) > 0,
        "traffic needs both tiers: {by_tier:?}"
    );

    let missing = promql::missing(&all, &scraped);
    assert!(
        missing.is_empty(),
        "{} references to metrics no scrape showed ({scrapes} scrapes of relay and agent, traffic {by_tier:?}):\n  {}\nrelay log:\n{}",
        missing.len(),
        missing.join("\n  "),
        relay.proc.log_tail(20)
    );
    let families: BTreeSet<&str> = wanted.iter().filter_map(|n| scraped.family_of(n)).collect();
    eprintln!(
        "{} queries name {} metrics of {} families, all exported ({scrapes} scrapes, {:.1} s)",
        all.len(),
        wanted.len(),
        families.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The tokenizer on hand-written expressions, and the check failing on a wrong name.
#[test]
fn tokenizer_finds_metric_names_and_the_check_catches_a_wrong_one() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"histogram_quantile(0.95, sum by (le, path) (rate(tierd_latency_seconds_bucket{device=~"$device", path!=""}[$__rate_interval])))"#,
            &["tierd_latency_seconds_bucket"],
        ),
        (
            "max without (instance, job) (tierd_device_threshold)\n< on (device) group_left\nmax by (device) (tierd_device_proposed_threshold{insufficient_evidence=\"false\"})",
            &["tierd_device_threshold", "tierd_device_proposed_threshold"],
        ),
        (
            "sum(rate(tierd_requests_total{tier=~\"cloud|edge_fallback\"}[5m] offset 1h)) / ignoring(tier) group_right(device) sum(rate(tierd_requests_total[1d])) > bool 1.5e-3 # tierd_comment_total",
            &["tierd_requests_total", "tierd_requests_total"],
        ),
        (
            "time() - tierd_device_last_seen_timestamp_seconds > 300 and topk(5, tierd_fleet_devices) unless absent(tierd_relay_store_writer) or vector(0)",
            &[
                "tierd_device_last_seen_timestamp_seconds",
                "tierd_fleet_devices",
                "tierd_relay_store_writer",
            ],
        ),
        (
            r#"label_replace(count_values("v", tierd_config_version), "dst", "$1", "src", "(.*)") * on() ${scale}"#,
            &["tierd_config_version"],
        ),
        (
            "max_over_time(tierd_spool_records[1h:5m] @ end()) + Inf - NaN * sum without(state) (tierd_spool_bytes)",
            &["tierd_spool_records", "tierd_spool_bytes"],
        ),
    ];
    for (expr, want) in cases {
        assert_eq!(promql::metric_names(expr).unwrap(), want.to_vec(), "{expr}");
    }
    assert!(promql::metric_names("sum(x{a=\"b\"").is_err());
    assert!(promql::metric_names("x]").is_err());

    assert_eq!(
        promql::templating_expr(
            r#"label_values(tierd_fleet_model_devices{group=~"$group"}, model)"#
        )
        .as_deref(),
        Some(r#"tierd_fleet_model_devices{group=~"$group"}"#)
    );
    assert_eq!(promql::templating_expr("label_values(device)"), None);
    assert_eq!(
        promql::templating_expr("query_result(topk(3, tierd_fleet_devices))").as_deref(),
        Some("topk(3, tierd_fleet_devices)")
    );

    // A scrape in miniature: a counter, a histogram, a gauge.
    let mut scraped = promql::Exposition::default();
    scraped.add(
        "# HELP tierd_requests Inference requests.\n# TYPE tierd_requests counter\n\
         tierd_requests_total{device=\"d\",tier=\"edge\"} 3\n\
         # TYPE tierd_latency_seconds histogram\n\
         tierd_latency_seconds_sum{path=\"edge\"} 0.1\ntierd_latency_seconds_count{path=\"edge\"} 3\n\
         tierd_latency_seconds_bucket{path=\"edge\",le=\"+Inf\"} 3\n\
         # TYPE tierd_threshold gauge\ntierd_threshold{signal=\"max_prob\"} 0.9\n# EOF\n",
    );
    assert_eq!(
        scraped.family_of("tierd_requests_total"),
        Some("tierd_requests")
    );
    assert_eq!(
        scraped.family_of("tierd_latency_seconds_bucket"),
        Some("tierd_latency_seconds")
    );
    assert_eq!(
        scraped.family_of("tierd_threshold"),
        Some("tierd_threshold")
    );
    let exprs = vec![
        (
            "good".to_string(),
            "sum(rate(tierd_requests_total[5m])) / histogram_quantile(0.5, rate(tierd_latency_seconds_bucket[5m])) * tierd_threshold".to_string(),
        ),
        (
            "typo".to_string(),
            // Singular `request`: not exported; and a histogram family without its suffix.
            "rate(tierd_request_total[5m]) + tierd_latency_seconds".to_string(),
        ),
    ];
    let missing = promql::missing(&exprs, &scraped);
    assert_eq!(missing.len(), 2, "{missing:#?}");
    assert!(
        missing[0].starts_with("typo: `tierd_request_total`"),
        "{missing:#?}"
    );
    assert!(missing[0].contains("tierd_requests_total"), "{missing:#?}");
    assert!(
        missing[1].contains("`tierd_latency_seconds`: family exported, but its samples are"),
        "{missing:#?}"
    );
}

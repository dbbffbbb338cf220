//! **The fleet dashboard**: a read-only web page of the fleet, served by the relay's HTTP API
//! at `GET /` (the fleet) and `GET /devices/{id}` (one device), behind the API's own guard
//! ([`crate::http_auth`]: `Host` allow-list, then the token).
//!
//! # What it shows
//! - The fleet: devices that reported, online/offline (their retained status), requests by
//!   tier over time (local, escalated to the cloud, escalated but answered locally after all,
//!   refused as overloaded), the fleet's escalation rate over time with the tuner's pushes
//!   marked, and cost and CO₂ saved against sending everything to the cloud — the figures
//!   of [`crate::report`] (`/api/report`), not a second computation of them.
//! - A table of devices (the first [`MAX_ROWS`] by id; all of them are in `/api/devices`):
//!   online state, model, threshold, escalation rate with a sparkline, agreement with the cloud
//!   and its lower bound, latency p50/p95 per path, energy per inference and the meter that
//!   measured it, money saved against all-cloud.
//! - One device: escalation rate and threshold over time with every tuner push marked,
//!   requests by tier per telemetry window, agreement and its (1 − δ) lower bound against the
//!   target with the bound the tuner certifies, latency p50/p95 per path, energy per local
//!   inference (and which meter), its three-way cost comparison and the report's notes.
//!
//! Plots are SVG rendered here ([`svg`]): no script at all, so the page's
//! `Content-Security-Policy` forbids every script; styles come from `/dashboard.css`. The page
//! reloads itself every [`REFRESH_S`] seconds (a `<meta>` refresh, no script). Every string a
//! device sent (its id, model name, meter, status reason) is escaped ([`svg::esc`]).
//!
//! # History
//! The relay otherwise keeps only each device's latest report; the plots come from
//! [`history`], a bounded ring per device fed where the fleet files a report or a status and
//! where intake files a calibration window or pushes a tuned threshold. Its limits are in its
//! module doc; it is **not persisted**: after a restart the plots start empty (the latest
//! state, the table and the cost figures come back from the fleet store as before). A follower
//! replica records the reports it reads from the store, so its plots are coarser (one point
//! per batch it follows) and lack the pushes and agreement estimates (only the writer sees
//! those happen).
//!
//! # Logging in from a browser
//! A browser cannot send the bearer header by itself, and a token in a URL ends up in logs and
//! history, so: `GET /login` is a form; `POST /login` with the token (form body, never the
//! URL) sets the session cookie of [`session`] (HttpOnly, SameSite=Strict, 12 hours, an HMAC
//! keyed by the token, not the token) and redirects to `/`. The guard accepts that cookie for
//! reads (GET/HEAD) in place of the bearer header; changes still need the bearer token.
//! `POST /logout` clears it. A page asked for without a session answers 401 with the login
//! form. `/login`, `/logout` and `/dashboard.css` pass the `Host` check like everything else,
//! and need no token. With `http.auth_reads = false` reads are open, so the dashboard is too,
//! like every other read.

pub mod history;
mod page;
pub mod session;
pub mod svg;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::fleet::{DeviceRecord, Fleet, Proposal};
use crate::http_auth::Access;
use crate::report::{usage, Prices};
use crate::state::{RelayState, SharedFleet};
use history::AgreementPoint;

/// Devices one page lists at most (by id); `/api/devices` has all.
pub const MAX_ROWS: usize = 200;
/// Time buckets of the fleet plots.
pub const FLEET_BUCKETS: usize = 60;
/// The page reloads itself this often, seconds.
pub const REFRESH_S: u32 = 30;
/// Tuner pushes marked on the fleet plot at most (the latest).
const MAX_FLEET_MARKERS: usize = 100;

/// Paths the guard lets through without a token (after the `Host` check).
pub const OPEN_PATHS: &[&str] = &["/login", "/logout", "/dashboard.css"];

/// Whether `path` is a dashboard page (a browser asking for it without a session gets the
/// login form, not a JSON error).
pub fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/devices/")
}

/// What the dashboard's routes need.
pub struct Dashboard {
    pub fleet: SharedFleet,
    pub prices: Prices,
    /// `tuning.delta` and `tuning.target`.
    pub delta: f64,
    pub target: f64,
    pub access: Arc<Access>,
}

pub fn router(d: Dashboard) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/devices/{id}", get(device))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/dashboard.css", get(css))
        .with_state(Arc::new(d))
}

/// The headers every dashboard answer carries: no script, no framing, no caching, no
/// sniffing, no referrer.
fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
}

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    secure_headers(&mut resp);
    resp
}

/// The guard's answer to a page asked for without a session: 401 with the login form.
pub fn login_required() -> Response {
    let mut resp = html(StatusCode::UNAUTHORIZED, page::login(None));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tierd-relay\""),
    );
    resp
}

async fn login_form() -> Response {
    html(StatusCode::OK, page::login(None))
}

async fn login(
    State(d): State<Arc<Dashboard>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let token = session::form_field(&body, "token").unwrap_or_default();
    let token = token.trim();
    if token.is_empty() || !d.access.token_matches(token) {
        tracing::warn!("dashboard login refused: wrong token");
        return html(
            StatusCode::UNAUTHORIZED,
            page::login(Some("That is not this relay's token.")),
        );
    }
    let value = session::mint(d.access.secret(), tierd_runtime::unix_ms() / 1000);
    let cookie = session::set_cookie(&value, session::over_https(&headers));
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure_headers(&mut resp);
    resp
}

async fn logout() -> Response {
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure_headers(&mut resp);
    resp
}

async fn css() -> Response {
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        page::CSS,
    )
        .into_response();
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn poisoned() -> Response {
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        page::message("Fleet state unavailable", "The fleet state is poisoned."),
    )
}

async fn overview(State(d): State<Arc<Dashboard>>) -> Response {
    let now = tierd_runtime::unix_ms();
    let view = match d.fleet.lock() {
        Ok(f) => page::Overview::build(&f, &d.prices, d.delta, now),
        Err(_) => return poisoned(),
    };
    html(StatusCode::OK, page::overview(&view))
}

async fn device(State(d): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    let now = tierd_runtime::unix_ms();
    let view = match d.fleet.lock() {
        Ok(f) => page::DeviceView::build(&f, &id, &d.prices, d.delta, d.target, now),
        Err(_) => return poisoned(),
    };
    match view {
        Some(v) => html(StatusCode::OK, page::device(&v)),
        None => html(
            StatusCode::NOT_FOUND,
            page::message(
                "No such device",
                &format!(
                    "No telemetry or status from device \u{201c}{}\u{201d} yet.",
                    svg::esc(&id)
                ),
            ),
        ),
    }
}

/// The tuner's agreement estimate of the device's primary model at the threshold it ran,
/// with its lower bound at the certificate's δ, and what the tuner certifies; `None` before
/// any labelled evidence. The same estimate as the cost report's ([`usage`]).
pub fn agreement_point(rec: &DeviceRecord, t_ms: u64) -> Option<AgreementPoint> {
    let c = rec.calibration.as_ref()?;
    if !c.bins.iter().any(|b| b.escalated_labelled + b.audited > 0) {
        return None;
    }
    let bins = crate::fleet::tuner_bins(&c.edges, &c.bins);
    let cert = &c.certificate;
    let (agreement, lower_bound) =
        crate::tuner::estimate_agreement(&bins, &c.cuts, c.running, cert.delta);
    Some(AgreementPoint {
        t_ms,
        running: c.running,
        agreement,
        lower_bound,
        certified_threshold: cert.threshold,
        certified_bound: cert.agreement_lower_bound,
        insufficient_evidence: cert.insufficient_evidence,
    })
}

/// Hook: intake filed a calibration window of `model` (a name) for `device`.
pub fn calibration_filed(fleet: &mut Fleet, device: &str, model: &str, now_ms: u64) {
    let point = fleet
        .get(device)
        .filter(|r| crate::fleet::model_name(&r.latest.model) == model)
        .and_then(|r| agreement_point(r, now_ms));
    if let Some(p) = point {
        fleet.history_mut().record_agreement(device, p);
    }
}

/// Hook: intake published a tuned threshold for `device`.
pub fn push_published(state: &RelayState, device: &str, proposal: &Proposal, now_ms: u64) {
    let why = if proposal.primary {
        proposal.in_force.why.clone()
    } else {
        format!("{}: {}", proposal.model, proposal.in_force.why)
    };
    if let Ok(mut f) = state.fleet() {
        f.history_mut()
            .record_push(device, now_ms, proposal.in_force.threshold, &why);
    }
}

/// The report's usage of every device, as `/api/report` computes it.
fn usages(f: &Fleet, delta: f64) -> Vec<crate::report::DeviceUsage> {
    f.devices().map(|d| usage(d, delta)).collect()
}

#[cfg(test)]
mod tests;

//! The dashboard over the real API router on 127.0.0.1: login, the guard, escaping, and the
//! pages with 0, 1 and many devices.

use std::collections::BTreeMap;

use axum::http::StatusCode;

use crate::api::{router, ApiDeps};
use crate::config::{HttpConfig, RelayConfig};
use crate::control::Control;
use crate::fleet::testing::{online, report};
use crate::fleet::Fleet;
use crate::report::Prices;
use crate::state::RelayState;
use tierd_protocol::Settings;
use tierd_runtime::mqtt::MqttConfig;

const TOKEN: &str = "t0ken-for-the-dashboard";

struct Server {
    base: String,
    http: reqwest::Client,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(fleet: Fleet, http: HttpConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::default();
    let control = Control::new(
        false,
        cfg.push_rules(),
        Settings::default(),
        BTreeMap::new(),
        BTreeMap::new(),
        8,
    );
    let (signer, _) = crate::signing::load_or_create(&dir.path().join("key.pk8")).unwrap();
    let relay = RelayState::new(fleet, control, signer);
    let client =
        tierd_runtime::link::Link::open(MqttConfig::default().options("dash-test").unwrap(), 8)
            .publisher();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(
        relay,
        ApiDeps {
            client,
            prices: Prices::default(),
            state_dir: dir.path().to_path_buf(),
            delta: 0.05,
            target: 0.99,
            access: crate::http_auth::Access::new(TOKEN.into(), &http, addr),
            metrics: crate::config::MetricsConfig::default(),
        },
    );
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        task,
        _dir: dir,
    }
}

impl Server {
    async fn get(
        &self,
        path: &str,
        cookie: Option<&str>,
    ) -> (StatusCode, String, reqwest::header::HeaderMap) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, resp.text().await.unwrap(), headers)
    }

    /// Logs in with `token`; the `name=value` of the cookie set, if any.
    async fn login(&self, token: &str) -> (StatusCode, Option<String>) {
        let resp = self
            .http
            .post(format!("{}/login", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
            .await
            .unwrap();
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                assert!(
                    v.contains("HttpOnly") && v.contains("SameSite=Strict"),
                    "{v}"
                );
                v.split(';').next().unwrap().to_string()
            });
        (resp.status(), cookie)
    }
}

/// The relay's clock: the pages plot up to now.
fn now() -> u64 {
    tierd_runtime::unix_ms()
}

fn one_device(id: &str) -> Fleet {
    let now = now();
    let mut f = Fleet::new(16);
    online(&mut f, id, now - 10_000);
    for seq in 1..=3 {
        let mut r = report(id, now - 10_000, seq, 5);
        r.window.cloud = seq;
        f.ingest(id, r, now - 3000 + seq * 1000).unwrap();
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_session_that_only_the_token_gets() {
    let s = serve(one_device("dev-1"), HttpConfig::default()).await;
    // Without anything: 401 with the login form, for both pages.
    for path in ["/", "/devices/dev-1"] {
        let (status, body, headers) = s.get(path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(body.contains("action=\"/login\""), "{body}");
        assert!(!body.contains("dev-1"), "{body}");
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'"));
    }
    // The login form, the styles and /health need no token; the JSON API still does.
    assert_eq!(s.get("/login", None).await.0, StatusCode::OK);
    assert_eq!(s.get("/dashboard.css", None).await.0, StatusCode::OK);
    assert_eq!(
        s.get("/api/devices", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A wrong token gets no cookie; a forged cookie opens nothing.
    let (status, cookie) = s.login("wrong").await;
    assert_eq!((status, cookie), (StatusCode::UNAUTHORIZED, None));
    assert_eq!(s.login("").await.1, None);
    let forged = format!("tierd_session={}.{}", now() / 1000 + 3600, "00".repeat(32));
    assert_eq!(
        s.get("/", Some(forged.as_str())).await.0,
        StatusCode::UNAUTHORIZED
    );
    let as_cookie = format!("tierd_session={TOKEN}");
    assert_eq!(
        s.get("/", Some(as_cookie.as_str())).await.0,
        StatusCode::UNAUTHORIZED
    );

    // The token (percent-encoded as a browser sends it) gets a cookie and a redirect to /.
    let resp = s
        .http
        .post(format!("{}/login", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", TOKEN.replace('-', "%2D")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/");
    let (_, cookie) = s.login(TOKEN).await;
    let cookie = cookie.expect("a session cookie");
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is not the token: {cookie}"
    );
    let (status, body, headers) = s.get("/", Some(cookie.as_str())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("href=\"/devices/dev-1\""), "{body}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    let (status, body, _) = s.get("/devices/dev-1", Some(cookie.as_str())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<svg class=\"plot\""), "{body}");
    // The cookie reads the JSON API too, but changes nothing: writes need the bearer token.
    assert_eq!(
        s.get("/api/devices", Some(cookie.as_str())).await.0,
        StatusCode::OK
    );
    let put = s
        .http
        .put(format!("{}/api/devices/dev-1/config", s.base))
        .header("cookie", &cookie)
        .body("{\"threshold\": 0.5}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::UNAUTHORIZED);
    // The bearer header works for the pages as for the API.
    let bearer = s
        .http
        .get(format!("{}/", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    // The Host allow-list applies to the login too.
    let rebound = s
        .http
        .post(format!("{}/login", s.base))
        .header("host", "evil.example")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    // Logging out clears the cookie.
    let out = s
        .http
        .post(format!("{}/logout", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    // An unknown device is a 404 page.
    assert_eq!(
        s.get("/devices/nobody", Some(cookie.as_str())).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_reads_off_the_pages_are_open_like_every_read() {
    let http = HttpConfig {
        auth_reads: false,
        ..HttpConfig::default()
    };
    let s = serve(one_device("dev-1"), http).await;
    let (status, body, _) = s.get("/", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("dev-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_device_strings_are_escaped_everywhere() {
    // Topic validation keeps such ids off the wire; the dashboard must not rely on it.
    let evil = "<script>alert(1)</script>\"'&x";
    let now = now();
    let mut f = Fleet::new(16);
    online(&mut f, evil, now - 10_000);
    let mut r = report(evil, now - 10_000, 1, 5);
    r.model = "<img src=x onerror=alert(2)>@1".into();
    r.energy.meter = "<svg onload=alert(3)>".into();
    f.ingest(evil, r, now - 1000).unwrap();
    f.history_mut()
        .record_push(evil, now - 500, 0.5, "</title><script>alert(4)</script>");
    let s = serve(f, HttpConfig::default()).await;
    let (_, cookie) = s.login(TOKEN).await;
    let cookie = cookie.unwrap();
    let (status, fleet_page, _) = s.get("/", Some(cookie.as_str())).await;
    assert_eq!(status, StatusCode::OK);
    let seg = "%3Cscript%3Ealert%281%29%3C%2Fscript%3E%22%27%26x";
    let (status, device_page, _) = s
        .get(&format!("/devices/{seg}"), Some(cookie.as_str()))
        .await;
    assert_eq!(status, StatusCode::OK, "{device_page}");
    for page in [&fleet_page, &device_page] {
        for raw in [
            "<script",
            "<img",
            "<svg onload",
            "onerror=alert(2)>",
            "\"'&x",
        ] {
            assert!(!page.contains(raw), "{raw} unescaped in:\n{page}");
        }
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;x"),
            "{page}"
        );
    }
    assert!(
        fleet_page.contains(&format!("href=\"/devices/{seg}\"")),
        "{fleet_page}"
    );
    assert!(
        device_page.contains("&lt;svg onload=alert(3)&gt;"),
        "{device_page}"
    );
    assert!(
        fleet_page.contains("&lt;/title&gt;&lt;script&gt;alert(4)"),
        "{fleet_page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_works_with_no_device_and_caps_many() {
    let s = serve(Fleet::new(16), HttpConfig::default()).await;
    let (_, cookie) = s.login(TOKEN).await;
    let cookie = cookie.unwrap();
    let (status, body, _) = s.get("/", Some(cookie.as_str())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("No device has reported telemetry yet"),
        "{body}"
    );
    assert!(body.contains("no data yet"), "{body}");
    drop(s);

    let n = super::MAX_ROWS + 25;
    let now = now();
    let mut f = Fleet::new(n);
    for i in 0..n {
        let id = format!("d{i:04}");
        online(&mut f, &id, now - 10_000);
        f.ingest(&id, report(&id, now - 10_000, 1, 3), now - 1000)
            .unwrap();
    }
    let s = serve(f, HttpConfig::default()).await;
    let (_, cookie) = s.login(TOKEN).await;
    let (status, body, _) = s.get("/", Some(cookie.unwrap().as_str())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.matches("<tr class=\"device\"").count(),
        super::MAX_ROWS
    );
    assert!(body.contains("25 more devices not listed"), "{body}");
}

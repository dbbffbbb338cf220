//! The dashboard's browser session: a cookie a browser gets from `POST /login` with the API
//! token, which the API's guard ([`crate::http_auth::guard`]) takes for reads in place of the
//! bearer header.
//!
//! The cookie is `tierd_session=<expiry>.<mac>`: the expiry (Unix seconds, [`MAX_AGE_S`] after
//! the login) and HMAC-SHA256 over it keyed with the API token. So the relay keeps no session
//! state, the cookie is not the token (the token cannot be read back from it), it stops working
//! at its expiry, and every cookie ever issued stops working when the token changes. It is
//! checked with `ring::hmac::verify` (constant time). `HttpOnly` (no script reads it),
//! `SameSite=Strict` (no other site's page makes the browser send it), `Path=/`, and `Secure`
//! when the request came over HTTPS through a proxy (`X-Forwarded-Proto: https`).
//!
//! It authorizes reads only (GET/HEAD: the dashboard and the JSON API): a change still needs
//! the bearer token, so even a page that got the browser to send the cookie could not change
//! a device's config.

use axum::http::{header, HeaderMap};

/// The cookie's name.
pub const COOKIE: &str = "tierd_session";
/// How long a login lasts: 12 hours.
pub const MAX_AGE_S: u64 = 12 * 60 * 60;

fn key(token: &str) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes())
}

fn message(expires_s: u64) -> String {
    format!("tierd dashboard session v1, expires {expires_s}")
}

/// A session value for `token`, valid until `now_s + MAX_AGE_S`.
pub fn mint(token: &str, now_s: u64) -> String {
    let expires = now_s.saturating_add(MAX_AGE_S);
    let tag = ring::hmac::sign(&key(token), message(expires).as_bytes());
    format!("{expires}.{}", hex::encode(tag.as_ref()))
}

/// Whether `value` is a session of `token` that has not expired at `now_s`.
pub fn verify(token: &str, value: &str, now_s: u64) -> bool {
    let Some((expires, mac)) = value.split_once('.') else {
        return false;
    };
    let (Ok(expires), Ok(mac)) = (expires.parse::<u64>(), hex::decode(mac)) else {
        return false;
    };
    // Not expired, and not from further ahead than a login gives (a clock set back).
    if expires <= now_s || expires > now_s.saturating_add(MAX_AGE_S + 300) {
        return false;
    }
    ring::hmac::verify(&key(token), message(expires).as_bytes(), &mac).is_ok()
}

/// Every value of our cookie in the request's `Cookie` headers.
pub fn presented(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value.trim())
        })
}

/// Whether the request carries a valid session of `token` now.
pub fn valid(token: &str, headers: &HeaderMap) -> bool {
    let now_s = tierd_runtime::unix_ms() / 1000;
    presented(headers).any(|v| verify(token, v, now_s))
}

/// The `Set-Cookie` value that logs the browser in.
pub fn set_cookie(value: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; Max-Age={MAX_AGE_S}; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that logs the browser out.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
}

/// The request came over HTTPS (as a TLS-terminating proxy says).
pub fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The `field` of an `application/x-www-form-urlencoded` body (the login form's `token`).
pub fn form_field(body: &[u8], field: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name)? == field).then(|| percent_decode(value))?
    })
}

/// `+` as space and `%XX` as the byte; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_session_is_bound_to_the_token_and_expires() {
        let now = 1_800_000_000;
        let v = mint("s3cret", now);
        assert!(!v.contains("s3cret"));
        assert!(verify("s3cret", &v, now));
        assert!(verify("s3cret", &v, now + MAX_AGE_S - 1));
        assert!(!verify("s3cret", &v, now + MAX_AGE_S), "expired");
        assert!(!verify("other", &v, now), "another token's");
        // A forged expiry with the old mac, a truncated mac, garbage.
        let (_, mac) = v.split_once('.').unwrap();
        assert!(!verify(
            "s3cret",
            &format!("{}.{mac}", now + 2 * MAX_AGE_S),
            now
        ));
        assert!(!verify("s3cret", &v[..v.len() - 2], now));
        for bad in ["", ".", "x.y", "123", "123.zz", &format!("{}.", now + 10)] {
            assert!(!verify("s3cret", bad, now), "{bad:?}");
        }
        // One minted far in the future (a clock set back since) is refused too.
        assert!(!verify("s3cret", &mint("s3cret", now + 3600), now));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_strictly() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; tierd_session=x.y"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("tierd_session = z"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("tierd_sessionx=w"));
        assert_eq!(presented(&h).collect::<Vec<_>>(), ["x.y"]);
        let c = set_cookie("v", false);
        for part in [
            "tierd_session=v",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=43200",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Secure"));
        assert!(set_cookie("v", true).ends_with("; Secure"));
        assert!(clear_cookie().contains("Max-Age=0"));
        let mut p = HeaderMap::new();
        assert!(!over_https(&p));
        p.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        assert!(over_https(&p));
    }

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(
            form_field(b"token=abc123", "token").as_deref(),
            Some("abc123")
        );
        assert_eq!(
            form_field(b"x=1&token=a%2Bb+c%3D&y=", "token").as_deref(),
            Some("a+b c=")
        );
        assert_eq!(form_field(b"token=", "token").as_deref(), Some(""));
        assert_eq!(form_field(b"tok=1", "token"), None);
        assert_eq!(form_field(b"token=%zz", "token"), None);
        assert_eq!(form_field(b"token=%ff", "token"), None);
        assert_eq!(form_field(&[0xff, b'='], "token"), None);
    }
}

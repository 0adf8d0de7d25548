//! Who may talk to the UI server: the one-time token, the session cookie, and the `Host` and
//! `Origin` checks. Every request passes [`check`] before any handler runs.

use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;

const COOKIE: &str = "aether_session";

pub struct Guard {
    port: u16,
    /// The URL's token until it is exchanged for the session.
    token: Mutex<Option<String>>,
    token_shown: String,
    session: String,
}

/// 32 random bytes as hex.
pub(super) fn secret() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)
        .map_err(|e| anyhow::anyhow!("no random numbers from the kernel: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Compares in time that depends only on the length, so a guess learns nothing from timing.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Guard {
    pub fn new(port: u16) -> anyhow::Result<Guard> {
        let token = secret()?;
        Ok(Guard {
            port,
            token: Mutex::new(Some(token.clone())),
            token_shown: token,
            session: secret()?,
        })
    }

    /// The token for the printed URL.
    pub fn token(&self) -> &str {
        &self.token_shown
    }

    fn allowed_host(&self, host: &str) -> bool {
        host == format!("127.0.0.1:{}", self.port) || host == format!("localhost:{}", self.port)
    }

    fn allowed_origin(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .is_some_and(|h| self.allowed_host(h))
    }

    /// Takes the token if `t` is it and it was not used yet.
    fn redeem(&self, t: &str) -> bool {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        match token.as_deref() {
            Some(k) if same(k, t) => {
                *token = None;
                true
            }
            _ => false,
        }
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == COOKIE && same(v, &self.session))
    }
}

fn refused(status: StatusCode, api: bool, message: &str) -> Response {
    if api {
        let code = if status == StatusCode::UNAUTHORIZED {
            "unauthenticated"
        } else {
            "permission_denied"
        };
        (
            status,
            axum::Json(serde_json::json!({ "error": message, "code": code })),
        )
            .into_response()
    } else {
        let page = format!(
            "<!doctype html><meta charset=utf-8><title>aether</title>\
             <body style=\"font-family:sans-serif;margin:3em\"><h1>aether</h1><p>{}</p>",
            message
        );
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response()
    }
}

fn token_of(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

pub async fn check(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let g = &state.guard;
    let api = req.uri().path().starts_with("/api/");
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !g.allowed_host(host) {
        return refused(
            StatusCode::FORBIDDEN,
            api,
            "refused: the Host header does not name this UI's loopback address and port",
        );
    }
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    let upgrade = headers.contains_key(header::UPGRADE);
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD) || upgrade;
    match origin {
        Some(o) if !g.allowed_origin(o) => {
            return refused(
                StatusCode::FORBIDDEN,
                api,
                "refused: the request comes from another site (Origin)",
            )
        }
        None if changes => {
            return refused(
                StatusCode::FORBIDDEN,
                api,
                "refused: a request that changes something must carry this UI's Origin",
            )
        }
        _ => {}
    }
    if req.uri().path() == "/" {
        if let Some(t) = token_of(req.uri().query()) {
            if g.redeem(t) {
                let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", g.session);
                let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    resp.headers_mut().insert(header::SET_COOKIE, v);
                }
                return resp;
            }
            if !g.has_session(headers) {
                return refused(
                    StatusCode::UNAUTHORIZED,
                    false,
                    "This link has been used already or is not the one <code>aether ui</code> printed. \
                     Run <code>aether ui</code> again and open the new link.",
                );
            }
        }
    }
    if !g.has_session(headers) {
        return refused(
            StatusCode::UNAUTHORIZED,
            api,
            if api {
                "no session: open the URL aether ui printed"
            } else {
                "Open the link <code>aether ui</code> printed (it carries a one-time token)."
            },
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_works_once() {
        let g = Guard::new(8080).unwrap();
        let t = g.token().to_owned();
        assert!(!g.redeem("00"));
        assert!(g.redeem(&t));
        assert!(!g.redeem(&t));
    }

    #[test]
    fn only_loopback_hosts_and_origins_of_this_port_pass() {
        let g = Guard::new(8080).unwrap();
        assert!(g.allowed_host("127.0.0.1:8080"));
        assert!(g.allowed_host("localhost:8080"));
        assert!(!g.allowed_host("127.0.0.1:8081"));
        assert!(!g.allowed_host("evil.example:8080"));
        assert!(!g.allowed_host("127.0.0.1"));
        assert!(g.allowed_origin("http://127.0.0.1:8080"));
        assert!(!g.allowed_origin("https://127.0.0.1:8080"));
        assert!(!g.allowed_origin("http://127.0.0.1:8080.evil.example"));
        assert!(!g.allowed_origin("null"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let g = Guard::new(1).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={}; c=d", g.session)).unwrap(),
        );
        assert!(g.has_session(&h));
        let mut bad = HeaderMap::new();
        bad.insert(
            header::COOKIE,
            HeaderValue::from_static("aether_session=0000"),
        );
        assert!(!g.has_session(&bad));
    }
}

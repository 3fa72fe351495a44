//! Who may talk to the server.
//!
//! - Exposure: the server binds loopback by default. Binding any other
//!   address without a token is refused at start, because the views are
//!   business data and the demo can write to the source.
//! - With a token, every request but `/healthz` (for load balancers and
//!   orchestrators, which carry no secrets) needs `Authorization: Bearer
//!   TOKEN`; anything else gets 401.
//! - The demo's writes refuse cross-site requests (403): a page on another
//!   site can make a visitor's browser send a request to 127.0.0.1, so a
//!   write must say it comes from our own page (`Sec-Fetch-Site`, else
//!   `Origin` equal to `Host`) and be JSON, which a cross-site form
//!   cannot send without a CORS preflight we never answer.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ServeError, Shared};

/// Refuses a non-loopback address without a token.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), ServeError> {
    let has_token = token.is_some_and(|t| !t.is_empty());
    if addr.ip().is_loopback() || has_token {
        Ok(())
    } else {
        Err(ServeError::OpenWithoutToken { addr })
    }
}

/// Compares in time independent of where the first difference is, so the
/// token cannot be guessed byte by byte from response times.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        "{\"error\":\"missing or wrong token: send Authorization: Bearer TOKEN\"}",
    )
        .into_response()
}

/// The token check, as middleware.
pub async fn require_token(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(token) = state.token.as_deref().filter(|t| !t.is_empty()) else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same_secret(given.trim().as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        _ => unauthorized(),
    }
}

fn forbidden(reason: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": reason }).to_string(),
    )
        .into_response()
}

/// Lets a write through only when it comes from our own page, as JSON.
/// The refusal is the response itself, returned by handlers with `?`; it
/// is built only for refused requests, so its size costs nothing.
#[allow(clippy::result_large_err)]
pub fn same_origin_json(headers: &HeaderMap) -> Result<(), Response> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let is_json = text(header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"error\":\"send the request as Content-Type: application/json\"}",
        )
            .into_response());
    }
    // Browsers send Sec-Fetch-Site on every request; "none" is the user
    // typing or a tool, "same-origin" our page.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return Err(forbidden("cross-site request refused"));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if origin_host.is_none() || origin_host != text(header::HOST) {
            return Err(forbidden("cross-origin request refused"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_rule() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let open: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(check_exposure(loopback, None).is_ok());
        assert!(check_exposure("[::1]:1".parse().unwrap(), None).is_ok());
        assert!(check_exposure(open, None).is_err());
        assert!(check_exposure(open, Some("")).is_err());
        assert!(check_exposure(open, Some("s3cret")).is_ok());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }

    #[test]
    fn writes_must_be_same_origin_json() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        let json = ("content-type", "application/json");
        let host = ("host", "127.0.0.1:8080");
        assert!(same_origin_json(&headers(&[json, host])).is_ok());
        assert!(
            same_origin_json(&headers(&[
                json,
                host,
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_ok()
        );
        let refused = |pairs: &[(&'static str, &'static str)]| {
            same_origin_json(&headers(pairs)).unwrap_err().status()
        };
        assert_eq!(
            refused(&[json, host, ("origin", "http://evil.example")]),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(&[json, host, ("sec-fetch-site", "cross-site")]),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(&[("content-type", "text/plain"), host]),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}

//! Bearer tokens for the `/v1` API: which configured token a request
//! presents, and whether its scope allows the request. Reading needs the
//! `read` scope, anything else `admin`. Every request is counted and logged
//! under the token's name, never the token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::config::{ApiToken, Scope};
use crate::metrics;

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<ApiToken>>);

impl Tokens {
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Tokens(Arc::new(tokens))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The token a request presents, if it is one of ours. Every token is
    /// compared (in constant time), whichever matches.
    fn find(&self, headers: &HeaderMap) -> Option<&ApiToken> {
        let presented = bearer(headers)?;
        let mut found = None;
        for token in self.0.iter() {
            if token.token.matches(presented) {
                found = Some(token);
            }
        }
        found
    }
}

/// The credentials of an `Authorization: Bearer …` header; the scheme's
/// case does not matter.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

fn required_scope(method: &Method) -> Scope {
    if method == Method::GET || method == Method::HEAD {
        Scope::Read
    } else {
        Scope::Admin
    }
}

/// The middleware: 401 without a known token, 403 when its scope is too
/// narrow; else the request, counted and logged under the token's name.
/// The name of the token a request presented, for handlers that record who
/// asked (an audit trail never holds the token itself).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

pub async fn require_token(
    State(tokens): State<Tokens>,
    mut request: Request,
    next: Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let Some(token) = tokens.find(request.headers()) else {
        metrics::api_request("none", StatusCode::UNAUTHORIZED.as_u16());
        tracing::info!(%method, path, status = 401, "API request without a known token");
        return unauthorized();
    };
    let name = token.name.as_str();
    let response = if token.scope >= required_scope(&method) {
        request.extensions_mut().insert(Caller(name.to_owned()));
        next.run(request).await
    } else {
        let message = format!("token `{name}` has the read scope; this needs admin");
        ApiError(StatusCode::FORBIDDEN, message).into_response()
    };
    let status = response.status().as_u16();
    metrics::api_request(name, status);
    tracing::info!(token = name, %method, path, status, "API request");
    response
}

fn unauthorized() -> Response {
    let message = "missing or invalid bearer token".to_owned();
    let mut response = ApiError(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            value.parse().expect("a header value"),
        );
        headers
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc "] {
            assert_eq!(bearer(&headers(value)), Some("abc"), "{value}");
        }
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
    }

    #[test]
    fn reading_needs_read_and_changing_needs_admin() {
        assert_eq!(required_scope(&Method::GET), Scope::Read);
        assert_eq!(required_scope(&Method::PUT), Scope::Admin);
        assert_eq!(required_scope(&Method::POST), Scope::Admin);
        assert!(Scope::Admin >= Scope::Read && Scope::Read < Scope::Admin);
    }
}

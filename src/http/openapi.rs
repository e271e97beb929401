//! The OpenAPI document of the HTTP API, generated from the handlers and
//! types themselves. `sendgate openapi` prints it; `docs/openapi.yaml` is a
//! copy a test keeps equal to it.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{BadRequest, ErrorBody, Forbidden, NotFound, Unauthorized, Unavailable};
use super::{admin, api, ops, runbook};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sendgate account API",
        version = "1",
        description = "Plan, balance and usage of an account, its credit usage log, and how many \
sends would pass right now. Served on sendgate's HTTP listener (`[http] listen`, default port \
9400) when an API token is configured; every `/v1` route needs `Authorization: Bearer <token>`. \
`/metrics`, `/healthz`, `/readyz` and `/runbook` on the same listener need no token.\n\n\
Every error is JSON `{\"error\": \"...\"}`, including a path the API does not serve (404), a \
method a path does not take (405), a request that took too long (408), a body over the limit \
(413) and a URI over the limit (414).",
    ),
    servers((url = "http://localhost:9400")),
    paths(
        api::show,
        api::put,
        api::ledger,
        api::capacity,
        api::adjust,
        api::job,
        api::usage,
        admin::consuming,
        admin::pause,
        admin::resume,
        ops::healthz,
        ops::readyz,
        ops::metrics_text,
        runbook::runbook
    ),
    components(schemas(ErrorBody), responses(BadRequest, Unauthorized, Forbidden, NotFound, Unavailable)),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "accounts", description = "What a user sees of an account, and what the scheduler asks before it enqueues"),
        (name = "admin", description = "Operator control of the process that answers"),
        (name = "operations", description = "Probes, metrics and the runbook, open without a token"),
    ),
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as YAML, as `docs/openapi.yaml` holds it.
pub fn yaml() -> String {
    ApiDoc::openapi()
        .to_yaml()
        .expect("the OpenAPI document serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let expected = yaml();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &expected).expect("docs/openapi.yaml is writable");
        }
        let actual = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/openapi.yaml is out of date: run UPDATE_DOCS=1 cargo test --lib openapi \
             (or sendgate openapi > docs/openapi.yaml)"
        );
    }

    #[test]
    fn every_operation_has_an_id_and_every_route_is_documented() {
        let doc = ApiDoc::openapi();
        let mut paths: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "/healthz",
                "/metrics",
                "/readyz",
                "/runbook",
                "/v1/accounts/{id}",
                "/v1/accounts/{id}/adjustments",
                "/v1/accounts/{id}/capacity",
                "/v1/accounts/{id}/jobs/{key}",
                "/v1/accounts/{id}/ledger",
                "/v1/accounts/{id}/usage",
                "/v1/admin/consuming",
                "/v1/admin/pause",
                "/v1/admin/resume",
            ]
        );
        let json = serde_json::to_value(&doc).expect("the document is JSON");
        let paths = json["paths"].as_object().expect("paths is an object");
        for (path, item) in paths {
            let operations = item.as_object().expect("a path item is an object");
            for (method, operation) in operations {
                assert!(
                    operation["operationId"].is_string(),
                    "{method} {path} has no operationId"
                );
            }
        }
    }
}

//! How the API answers an error: a status and `{"error": "..."}`
//! ([`ApiError`]), from a store error or bad input, and the error
//! responses the OpenAPI document names.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use utoipa::{ToResponse, ToSchema};

use crate::store::StoreError;

/// An error as the API returns it: a status and `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::UnknownAccount(_) => ApiError(StatusCode::NOT_FOUND, err.to_string()),
            StoreError::InvalidAccount(_) => ApiError(StatusCode::BAD_REQUEST, err.to_string()),
            StoreError::AccountExists { .. } | StoreError::AdjustmentRefused(_) => {
                ApiError(StatusCode::CONFLICT, err.to_string())
            }
            StoreError::Unavailable(_) | StoreError::Contention => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable; try again".to_owned(),
            ),
            _ => {
                tracing::error!(error = %err, "account API failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        }
    }
}

pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// Any path the API does not serve: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such resource".to_owned())
}

/// A method the path does not take: a JSON 405.
pub async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed here".to_owned(),
    )
}

/// The body of every error response.
#[derive(ToSchema)]
#[schema(example = json!({"error": "no account `acme`"}))]
pub struct ErrorBody {
    /// What was wrong, in a sentence.
    pub error: String,
}

/// Bad input: the account id, a body field, a query parameter or a path
/// that is not UTF-8. The error says which.
#[derive(ToResponse)]
#[response(
    description = "Bad input (account id, plan, time zone, paging); the error says which",
    example = json!({"error": "`limit` must be an integer from 1 to 500"})
)]
pub struct BadRequest(pub ErrorBody);

/// A missing or wrong bearer token.
#[derive(ToResponse)]
#[response(
    description = "Missing or wrong bearer token",
    example = json!({"error": "missing or invalid bearer token"})
)]
pub struct Unauthorized(pub ErrorBody);

/// A token whose scope is too narrow for the call.
#[derive(ToResponse)]
#[response(
    description = "The token has the read scope; the call needs admin",
    example = json!({"error": "token `dashboard` has the read scope; this needs admin"})
)]
pub struct Forbidden(pub ErrorBody);

/// No such account.
#[derive(ToResponse)]
#[response(
    description = "No such account",
    example = json!({"error": "no account `acme`"})
)]
pub struct NotFound(pub ErrorBody);

/// The database did not answer; the call can be repeated.
#[derive(ToResponse)]
#[response(
    description = "The database is unavailable; try again",
    example = json!({"error": "database unavailable; try again"})
)]
pub struct Unavailable(pub ErrorBody);

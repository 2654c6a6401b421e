//! Errors as OpenAI reports them: a status and `{"error": {"message", "type", "param",
//! "code"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ecache_engine::SubmitError;

use crate::openai::{ErrorBody, ErrorDetail};

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request cannot be served as given; `param` names the field.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        Self::invalid(
            format!("the model `{asked}` does not exist; this server serves `{served}`"),
            Some("model"),
        )
        .status(StatusCode::NOT_FOUND)
        .with_code("model_not_found")
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid API key is required: send `Authorization: Bearer KEY`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 500 for a request that failed inside the engine.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The error as JSON text (for a server-sent event).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }

    /// A refusal of the engine, with its field named as the request named it.
    pub fn from_submit(e: SubmitError, max_tokens_field: &str) -> Self {
        match e {
            SubmitError::Invalid { message, param } => {
                let param = param.map(|p| match p.as_str() {
                    "max_new_tokens" => max_tokens_field.to_string(),
                    "policy" => "kv_cache".into(),
                    "prompt" | "image" | "answer" => "messages".into(),
                    _ => p,
                });
                Self {
                    param,
                    ..Self::invalid(message, None)
                }
            }
            SubmitError::QueueFull(_) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            SubmitError::ShuttingDown => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: Some("shutting_down"),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

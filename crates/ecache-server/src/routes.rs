//! The handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State as Extract};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ecache_engine::{Completion, Event, RequestHandle};
use futures_util::stream::{self, Stream};
use subtle::ConstantTimeEq;

use crate::State;
use crate::convert::{Defaults, convert};
use crate::error::ApiError;
use crate::openai::{
    AnswerMessage, ChatRequest, ChatResponse, Choice, Chunk, ChunkChoice, Delta, Model, ModelList,
    Usage,
};

type Shared = Arc<State>;

pub(crate) fn router(state: Shared) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    axum::Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .with_state(state)
}

async fn auth(Extract(state): Extract<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            state.metrics.respond(401);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn not_found(request: Request) -> ApiError {
    ApiError::invalid(
        format!("no route {} {}", request.method(), request.uri().path()),
        None,
    )
    .status(StatusCode::NOT_FOUND)
}

async fn health(Extract(state): Extract<Shared>) -> Response {
    if state.engine.accepting() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "shutting down"})),
        )
            .into_response()
    }
}

async fn metrics(Extract(state): Extract<Shared>) -> Response {
    let text = state.metrics.render(&state.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn models(Extract(state): Extract<Shared>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![Model {
            id: state.engine.info().id.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "ecache".into(),
        }],
    })
}

async fn chat(Extract(state): Extract<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    match answer(&state, body, arrived).await {
        Ok(response) => response,
        Err(e) => {
            state.metrics.respond(e.status.as_u16());
            tracing::info!(status = e.status.as_u16(), "refused: {}", e.message);
            e.into_response()
        }
    }
}

async fn answer(
    state: &Shared,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::invalid(r.body_text(), None).status(r.status()))?;
    let chat: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            format!("the body is not a chat completion request: {e}"),
            None,
        )
    })?;
    let stream = chat.stream;
    let info = state.engine.info();
    let defaults = Defaults {
        model: &info.id,
        policy: state.engine.default_policy(),
        max_tokens: state.config.max_tokens,
    };
    let converted = convert(chat, &defaults)?;
    let engine = state.engine.clone();
    let field = converted.max_tokens_field;
    // Tokenising and decoding an image take a while: not on the async workers.
    let handle = tokio::task::spawn_blocking(move || engine.submit(converted.request))
        .await
        .map_err(|e| ApiError::internal(format!("submitting failed: {e}")))?
        .map_err(|e| ApiError::from_submit(e, field))?;
    let id = format!("chatcmpl-{}", handle.id());
    let meta = Meta {
        id,
        created: unix_now(),
        model: info.id.clone(),
        include_usage: converted.include_usage,
        arrived,
    };
    state.metrics.respond(200);
    if stream {
        let events = sse_events(handle, meta, state.clone());
        Ok(axum::response::sse::Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        let done = handle
            .completion()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        observe(state, &done, arrived);
        Ok(Json(ChatResponse {
            id: meta.id,
            object: "chat.completion".into(),
            created: meta.created,
            model: meta.model,
            choices: vec![Choice {
                index: 0,
                message: AnswerMessage {
                    role: "assistant".into(),
                    content: done.text,
                },
                finish_reason: done.finish_reason.as_str().into(),
            }],
            usage: done.usage.into(),
        })
        .into_response())
    }
}

fn observe(state: &Shared, done: &Completion, arrived: Instant) {
    let seconds = arrived.elapsed().as_secs_f64();
    tracing::info!(
        policy = %done.stats.policy,
        budget = done.stats.budget,
        prompt_tokens = done.usage.prompt_tokens,
        completion_tokens = done.usage.completion_tokens,
        finish = done.finish_reason.as_str(),
        first_token_s = done.stats.first_token_seconds,
        seconds,
        "chat completion"
    );
    state.metrics.latency.observe(seconds);
    state
        .metrics
        .first_token
        .observe(done.stats.first_token_seconds);
}

/// What every chunk of one answer repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    arrived: Instant,
}

impl Meta {
    fn chunk(&self, delta: Delta, finish: Option<&str>) -> Chunk {
        Chunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_string),
            }],
            usage: self.include_usage.then_some(None),
        }
    }
}

enum Phase {
    Start,
    Tokens,
    Usage(Usage),
    Done,
    End,
}

/// The answer as server-sent events in OpenAI's chunk format, ending with `[DONE]`. The
/// stream owns the request's handle: a client that goes away drops it, which cancels the
/// request.
fn sse_events(
    handle: RequestHandle,
    meta: Meta,
    state: Shared,
) -> impl Stream<Item = Result<Sse, std::convert::Infallible>> {
    let json = |value: &dyn erased::Json| Sse::default().data(value.text());
    stream::unfold(
        (handle, meta, state, Phase::Start),
        move |(mut handle, meta, state, phase)| async move {
            let (event, next) = match phase {
                Phase::Start => {
                    let delta = Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    };
                    (json(&meta.chunk(delta, None)), Phase::Tokens)
                }
                Phase::Tokens => loop {
                    match handle.next().await {
                        Some(Event::Token { text, .. }) if text.is_empty() => continue,
                        Some(Event::Token { text, .. }) => {
                            let delta = Delta {
                                role: None,
                                content: Some(text),
                            };
                            break (json(&meta.chunk(delta, None)), Phase::Tokens);
                        }
                        Some(Event::Done(done)) => {
                            observe(&state, &done, meta.arrived);
                            let chunk =
                                meta.chunk(Delta::default(), Some(done.finish_reason.as_str()));
                            let next = if meta.include_usage {
                                Phase::Usage(done.usage.into())
                            } else {
                                Phase::Done
                            };
                            break (json(&chunk), next);
                        }
                        Some(Event::Failed(why)) => {
                            break (json(&ApiError::internal(why).body()), Phase::Done);
                        }
                        None => {
                            let e =
                                ApiError::internal("the engine stopped before the answer finished");
                            break (json(&e.body()), Phase::Done);
                        }
                    }
                },
                Phase::Usage(usage) => {
                    let mut chunk = meta.chunk(Delta::default(), None);
                    chunk.choices.clear();
                    chunk.usage = Some(Some(usage));
                    (json(&chunk), Phase::Done)
                }
                Phase::Done => (Sse::default().data("[DONE]"), Phase::End),
                Phase::End => return None,
            };
            Some((Ok(event), (handle, meta, state, next)))
        },
    )
}

mod erased {
    /// A value that serialises to JSON text.
    pub trait Json {
        fn text(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn text(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

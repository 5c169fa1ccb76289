//! The HTTP API for backends (sessions, publish, broadcast, direct, presence, history, disconnect,
//! drain) and the operational endpoints (`/healthz`, `/readyz`, `/metrics`). The OpenAPI document at
//! `/api/openapi.json` is generated from these handlers and their types.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use switchyard_core::backend::{DisconnectTarget, STATUS_ACTIVE, Session, SessionRecord};
use switchyard_core::node::RequestError;
use switchyard_proto::{ErrorCode, Payload, RoomName, UserId};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// One of the protocol's error codes, e.g. `BAD_REQUEST`, `UNAUTHORIZED`, `UNAVAILABLE`.
    pub code: String,
    /// What was wrong, naming the field or value.
    pub message: String,
}

/// An error answered as JSON with a 4xx or 503 status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::BadRequest, message)
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match e.code {
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code, e.message)
    }
}

impl From<switchyard_core::backend::BackendError> for ApiError {
    fn from(e: switchyard_core::backend::BackendError) -> Self {
        RequestError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiErrorBody {
                code: self.code.as_str().to_string(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

/// A JSON body whose rejections are JSON errors that name the problem.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let status = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let code = match &rejection {
                    JsonRejection::JsonSyntaxError(_) => ErrorCode::InvalidMessageFormat,
                    _ => ErrorCode::BadRequest,
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// Query parameters whose rejections are JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))
    }
}

fn room(name: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(name).map_err(|e| ApiError::bad_request(format!("invalid room: {e}")))
}

fn user(id: &str, field: &str) -> Result<UserId, ApiError> {
    UserId::parse(id).map_err(|e| ApiError::bad_request(format!("invalid {field}: {e}")))
}

fn payload(value: &serde_json::Value) -> Result<Payload, ApiError> {
    Payload::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid data: {e}")))
}

fn idempotency_id(id: Option<String>) -> Result<Option<String>, ApiError> {
    match id {
        Some(id) if id.is_empty() || id.len() > switchyard_proto::client::MAX_ID_BYTES => {
            Err(ApiError::bad_request(format!(
                "id must be 1 to {} bytes long",
                switchyard_proto::client::MAX_ID_BYTES
            )))
        }
        other => Ok(other),
    }
}

/// Requires `Authorization: Bearer <api key>` on `/api/*` when a key is configured.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.config().api_key.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if !path.starts_with("/api/") || path == "/api/openapi.json" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(key) if constant_time_eq(key.as_bytes(), expected.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "invalid API key",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this API needs `Authorization: Bearer <api key>`",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---- sessions ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The user's id: a string or an integer.
    #[schema(value_type = Object, example = "alice")]
    pub user_id: serde_json::Value,
    /// Arbitrary preferences kept with the session.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub preferences: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedSession {
    pub session_id: String,
    /// Seconds until the session expires unless used.
    pub expires_in: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    #[schema(value_type = Object)]
    pub user_id: serde_json::Value,
    pub created_at: String,
    #[schema(value_type = Object)]
    pub preferences: serde_json::Value,
    /// `active` or `disconnected`.
    pub status: String,
    pub expires_in: u64,
}

impl From<Session> for SessionView {
    fn from(s: Session) -> Self {
        SessionView {
            session_id: s.id,
            user_id: s.record.user_id,
            created_at: s.record.created_at,
            preferences: s.record.preferences,
            status: s.record.status,
            expires_in: s.expires_in,
        }
    }
}

/// Python's `datetime.utcnow().isoformat()`, as the seed's SessionManager writes `created_at`.
fn seed_timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]"
    );
    now.format(&format).unwrap_or_default()
}

/// Create a session (the seed's `SessionManager.create_session`).
#[utoipa::path(post, path = "/api/sessions", tag = "sessions", request_body = CreateSession,
    responses((status = 201, body = CreatedSession), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn create_session(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<CreatedSession>), ApiError> {
    let preferences = body.preferences.unwrap_or_else(|| serde_json::json!({}));
    if !preferences.is_object() {
        return Err(ApiError::bad_request("preferences must be a JSON object"));
    }
    let record = SessionRecord {
        user_id: body.user_id,
        created_at: seed_timestamp(),
        preferences,
        status: STATUS_ACTIVE.into(),
        extra: serde_json::Map::new(),
    };
    if record.user().is_none() {
        return Err(ApiError::bad_request(
            "user_id must be a non-empty string (at most 255 bytes, no control characters) or an integer",
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let session = state.node().backends.sessions.create(&id, &record).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedSession {
            session_id: session.id,
            expires_in: session.expires_in,
        }),
    ))
}

/// Read a session without extending it.
#[utoipa::path(get, path = "/api/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionView), (status = 404, body = ApiErrorBody)))]
async fn get_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    match state.node().backends.sessions.get(&id).await? {
        Some(session) => Ok(Json(session.into())),
        None => Err(ApiError::not_found(format!(
            "no session {id} (never created, expired or deleted)"
        ))),
    }
}

/// Terminate a session: delete it and close its connections with 4001.
#[utoipa::path(delete, path = "/api/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "session id")),
    responses((status = 204), (status = 404, body = ApiErrorBody)))]
async fn delete_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let node = state.node();
    let existed = node.backends.sessions.delete(&id).await?;
    node.disconnect(&DisconnectTarget::Session(id.clone())).await?;
    if existed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no session {id}")))
    }
}

// ---- messaging ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub room: String,
    /// Any JSON value.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// Idempotency key: a repeat within the dedup window returns the first offset.
    pub id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublishResponse {
    pub offset: u64,
    pub epoch: String,
    /// True when the id was seen before and nothing new was stored.
    pub duplicate: bool,
}

/// Publish to a room as the server.
#[utoipa::path(post, path = "/api/publish", tag = "messaging", request_body = PublishRequest,
    responses((status = 200, body = PublishResponse), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn publish(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<PublishRequest>,
) -> Result<Json<PublishResponse>, ApiError> {
    let room = room(&body.room)?;
    let outcome = state
        .node()
        .publish(&room, None, payload(&body.data)?, idempotency_id(body.id)?)
        .await?;
    Ok(Json(PublishResponse {
        offset: outcome.offset,
        epoch: outcome.epoch,
        duplicate: outcome.duplicate,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub ok: bool,
}

/// Send a `system` frame to every connection on every node.
#[utoipa::path(post, path = "/api/broadcast", tag = "messaging", request_body = BroadcastRequest,
    responses((status = 200, body = Accepted), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn broadcast(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BroadcastRequest>,
) -> Result<Json<Accepted>, ApiError> {
    state.node().broadcast(payload(&body.data)?).await?;
    Ok(Json(Accepted { ok: true }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectRequest {
    /// The recipient's user id.
    pub to: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DirectResponse {
    /// The message's sequence number in the recipient's inbox.
    pub seq: u64,
    pub duplicate: bool,
}

/// Send a direct message to every connection of a user (kept in the inbox until acknowledged).
#[utoipa::path(post, path = "/api/direct", tag = "messaging", request_body = DirectRequest,
    responses((status = 200, body = DirectResponse), (status = 400, body = ApiErrorBody), (status = 429, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn direct(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DirectRequest>,
) -> Result<Json<DirectResponse>, ApiError> {
    let to = user(&body.to, "to")?;
    let outcome = state
        .node()
        .direct(&to, None, payload(&body.data)?, idempotency_id(body.id)?)
        .await?;
    Ok(Json(DirectResponse {
        seq: outcome.seq,
        duplicate: outcome.duplicate,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    pub user_id: String,
}

/// Close every connection of a user on every node (close code 4003).
#[utoipa::path(post, path = "/api/disconnect", tag = "messaging", request_body = DisconnectRequest,
    responses((status = 200, body = Accepted), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn disconnect(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DisconnectRequest>,
) -> Result<Json<Accepted>, ApiError> {
    let target = DisconnectTarget::User(user(&body.user_id, "user_id")?);
    state.node().disconnect(&target).await?;
    Ok(Json(Accepted { ok: true }))
}

// ---- rooms ----

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceUser {
    pub user_id: String,
    pub connections: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceResponse {
    pub room: String,
    pub users: Vec<PresenceUser>,
}

/// Users present in a room.
#[utoipa::path(get, path = "/api/rooms/{room}/presence", tag = "rooms", params(("room" = String, Path, description = "room name")),
    responses((status = 200, body = PresenceResponse), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn presence(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PresenceResponse>, ApiError> {
    let room = room(&name)?;
    let users = state.node().backends.presence.list(&room).await?;
    Ok(Json(PresenceResponse {
        room: room.to_string(),
        users: users
            .into_iter()
            .map(|e| PresenceUser {
                user_id: e.user_id.to_string(),
                connections: e.connections,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only publications with a greater offset; without it, the latest `limit`.
    pub since: Option<u64>,
    /// At most this many (default 100, capped by `max_history_limit`).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryResponse {
    pub room: String,
    /// The room's current offset.
    pub offset: u64,
    pub epoch: String,
    pub publications: Vec<HistoryEntry>,
}

/// A room's history, oldest first.
#[utoipa::path(get, path = "/api/rooms/{room}/history", tag = "rooms", params(("room" = String, Path, description = "room name"), HistoryQuery),
    responses((status = 200, body = HistoryResponse), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn history(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let room = room(&name)?;
    let node = state.node();
    if query.limit == Some(0) {
        return Err(ApiError::bad_request("limit must be at least 1"));
    }
    let limit = query.limit.unwrap_or(100).min(node.settings.max_history_limit);
    let page = node.backends.broker.history(&room, query.since, limit).await?;
    Ok(Json(HistoryResponse {
        room: room.to_string(),
        offset: page.position.offset,
        epoch: page.position.epoch,
        publications: page
            .publications
            .iter()
            .map(|p| HistoryEntry {
                offset: p.offset,
                from: p.from.as_ref().map(|u| u.to_string()),
                data: p.data.to_value(),
                ts: p.ts,
                id: p.id.clone(),
            })
            .collect(),
    }))
}

// ---- operations ----

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub status: String,
}

/// Start draining this node: `/readyz` turns 503, clients are told to reconnect in paced batches,
/// and the process exits when they are gone or at the drain timeout.
#[utoipa::path(post, path = "/api/drain", tag = "operations", responses((status = 202, body = Status)))]
async fn drain(State(state): State<AppState>) -> (StatusCode, Json<Status>) {
    state.request_drain();
    (
        StatusCode::ACCEPTED,
        Json(Status {
            status: "draining".into(),
        }),
    )
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok".into() })
}

/// Readiness: 200 when this node takes traffic; 503 while draining or when the backend is unusable.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, body = Status), (status = 503, body = Status)))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Status>) {
    let node = state.node();
    if node.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Status {
                status: "draining".into(),
            }),
        );
    }
    match node.backends.broker.check().await {
        Ok(()) => (
            StatusCode::OK,
            Json(Status {
                status: "ready".into(),
            }),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Status {
                status: e.to_string(),
            }),
        ),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (headers, state.node().metrics.encode())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard HTTP API", description = "Server-side API of Switchyard. When an API key is configured, \
        every /api/ path except this document needs `Authorization: Bearer <api key>`."),
    tags((name = "sessions"), (name = "messaging"), (name = "rooms"), (name = "operations"))
)]
struct ApiDoc;

/// The API routes (under `/api`) and the ops routes, with the OpenAPI document built from them.
pub fn routes() -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_session))
        .routes(routes!(get_session, delete_session))
        .routes(routes!(publish))
        .routes(routes!(broadcast))
        .routes(routes!(direct))
        .routes(routes!(disconnect))
        .routes(routes!(presence))
        .routes(routes!(history))
        .routes(routes!(drain));
    let ops = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics));
    (api, ops)
}

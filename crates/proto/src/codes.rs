//! Error codes carried in `error` frames and WebSocket close codes.

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame. The first two are the seed's (Django ChatConsumer) codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidMessageFormat,
    /// The server failed while handling a well-formed frame.
    InternalError,
    /// The connection is not authenticated (or the session is not valid).
    Unauthorized,
    /// The request is not allowed, e.g. publishing to a room the connection has not joined.
    Forbidden,
    /// Too many requests; slow down.
    RateLimited,
    /// The frame or payload is larger than allowed.
    MessageTooLarge,
    /// Well-formed JSON that is not a valid request: unknown `type`, missing or invalid field.
    BadRequest,
    /// The backend (broker) cannot take the request now; nothing was stored. Retry later.
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessageFormat => "INVALID_MESSAGE_FORMAT",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes used by Switchyard. Codes 4000–4999 are application codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1001: going away (idle timeout, server shutting down without drain).
    GoingAway,
    /// 1002: WebSocket protocol error.
    ProtocolError,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload,
    /// 1008: policy violation (e.g. authentication not completed in time).
    Policy,
    /// 1009: a frame exceeded the size limit.
    TooBig,
    /// 1011: internal server error.
    Internal,
    /// 1012: service restart; reconnect now (after the `reconnect` frame's delay).
    ServiceRestart,
    /// 1013: try again later (overloaded).
    TryLater,
    /// 4001: invalid, expired or terminated session (the seed's code).
    InvalidSession,
    /// 4003: forbidden or bad token.
    Forbidden,
    /// 4004: token expired.
    TokenExpired,
    /// 4008: slow consumer; reconnect and recover from history.
    SlowConsumer,
    /// 4029: rate limited.
    RateLimited,
}

impl CloseCode {
    /// The numeric code sent in the close frame.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::ServiceRestart => 1012,
            CloseCode::TryLater => 1013,
            CloseCode::InvalidSession => 4001,
            CloseCode::Forbidden => 4003,
            CloseCode::TokenExpired => 4004,
            CloseCode::SlowConsumer => 4008,
            CloseCode::RateLimited => 4029,
        }
    }

    /// Whether a client should reconnect after this close (with backoff and resume).
    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::InvalidSession
                | CloseCode::Forbidden
                | CloseCode::TokenExpired
                | CloseCode::Policy
                | CloseCode::TooBig
                | CloseCode::InvalidPayload
                | CloseCode::ProtocolError
        )
    }
}

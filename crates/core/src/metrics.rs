//! Prometheus metrics, with the seed's names (`websocket_*`). Label sets are resolved once here, so
//! the per-message path only touches atomics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

/// Inbound message types counted by `websocket_messages_total{type}`.
pub const MESSAGE_TYPES: &[&str] = &[
    "auth",
    "join",
    "leave",
    "publish",
    "direct",
    "presence",
    "history",
    "refresh",
    "inbox_ack",
    "ping",
    "chat",
    "invalid",
];

/// Why a connection attempt failed, for `websocket_connections_failed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The WebSocket handshake was refused (bad request, draining, limits).
    Handshake,
    /// The session was missing, invalid or expired.
    Auth,
    /// Authentication did not complete in time.
    AuthTimeout,
    /// The backend could not be reached while authenticating.
    Backend,
}

impl FailReason {
    fn label(self) -> &'static str {
        match self {
            FailReason::Handshake => "handshake",
            FailReason::Auth => "auth",
            FailReason::AuthTimeout => "auth_timeout",
            FailReason::Backend => "backend",
        }
    }
}

const FAIL_REASONS: [FailReason; 4] = [
    FailReason::Handshake,
    FailReason::Auth,
    FailReason::AuthTimeout,
    FailReason::Backend,
];

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub active_connections: Gauge,
    pub connections_opened: Counter,
    failed: Vec<(FailReason, Counter)>,
    pub connection_duration: Histogram,
    messages: Vec<(&'static str, Counter)>,
    pub messages_delivered: Counter,
    pub message_latency: Histogram,
    pub message_size: Histogram,
    pub slow_consumers: Counter,
    closes: Family<CodeLabel, Counter>,
    pub rooms: Gauge,
    pub draining: Gauge,
    pub write_coalescing: Gauge,
    pub backend_errors: Counter,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Gauge,
    breaker_transitions: Family<ToLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabel {
    to: &'static str,
}

/// States of the backend circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let active_connections = Gauge::default();
        registry.register(
            "websocket_active_connections",
            "Open WebSocket connections",
            active_connections.clone(),
        );
        let connections_opened = Counter::default();
        registry.register(
            "websocket_connections_opened",
            "WebSocket connections accepted and authenticated",
            connections_opened.clone(),
        );
        let failed_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "websocket_connections_failed",
            "WebSocket connection attempts that failed, by reason",
            failed_family.clone(),
        );
        let failed = FAIL_REASONS
            .iter()
            .map(|r| {
                (
                    *r,
                    failed_family
                        .get_or_create(&ReasonLabel { reason: r.label() })
                        .clone(),
                )
            })
            .collect();
        let connection_duration = Histogram::new(exponential_buckets(0.1, 4.0, 10));
        registry.register(
            "websocket_connection_duration_seconds",
            "How long WebSocket connections stayed open",
            connection_duration.clone(),
        );
        let messages_family = Family::<TypeLabel, Counter>::default();
        registry.register(
            "websocket_messages",
            "Messages received from clients, by type",
            messages_family.clone(),
        );
        let messages = MESSAGE_TYPES
            .iter()
            .map(|t| {
                (
                    *t,
                    messages_family.get_or_create(&TypeLabel { r#type: t }).clone(),
                )
            })
            .collect();
        let messages_delivered = Counter::default();
        registry.register(
            "websocket_messages_delivered",
            "Frames queued to clients for publications, direct messages and broadcasts",
            messages_delivered.clone(),
        );
        let message_latency = Histogram::new(exponential_buckets(0.000_01, 4.0, 10));
        registry.register(
            "websocket_message_latency_seconds",
            "Time to process one client message, from receipt to reply queued",
            message_latency.clone(),
        );
        let message_size = Histogram::new(exponential_buckets(16.0, 4.0, 8));
        registry.register(
            "websocket_message_size_bytes",
            "Size of messages received from clients",
            message_size.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "websocket_slow_consumers",
            "Connections closed with 4008 because their outbound queue overflowed or expired",
            slow_consumers.clone(),
        );
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register(
            "websocket_closes",
            "Connections closed by the server, by close code",
            closes.clone(),
        );
        let rooms = Gauge::default();
        registry.register(
            "websocket_rooms",
            "Rooms with at least one connection on this node",
            rooms.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "switchyard_draining",
            "1 while this node is draining",
            draining.clone(),
        );
        let write_coalescing = Gauge::default();
        registry.register(
            "switchyard_write_coalescing",
            "1 while this node's workers are busy and writes wait `busy_write_delay_ms` to share sends",
            write_coalescing.clone(),
        );
        let backend_errors = Counter::default();
        registry.register(
            "switchyard_backend_errors",
            "Backend calls that failed (unavailable or corrupt)",
            backend_errors.clone(),
        );
        let breaker_state = Gauge::default();
        registry.register(
            "switchyard_backend_circuit_state",
            "Backend circuit breaker: 0 closed, 1 open (failing fast), 2 half-open (probing)",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<ToLabel, Counter>::default();
        registry.register(
            "switchyard_backend_circuit_transitions",
            "Backend circuit breaker state changes, by new state",
            breaker_transitions.clone(),
        );
        Metrics {
            registry,
            breaker_state,
            breaker_transitions,
            active_connections,
            connections_opened,
            failed,
            connection_duration,
            messages,
            messages_delivered,
            message_latency,
            message_size,
            slow_consumers,
            closes,
            rooms,
            draining,
            write_coalescing,
            backend_errors,
        }
    }

    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// Counts one received message of `type_name` (one of [`MESSAGE_TYPES`]).
    pub fn message(&self, type_name: &str) {
        if let Some((_, counter)) = self.messages.iter().find(|(t, _)| *t == type_name) {
            counter.inc();
        }
    }

    pub fn failed(&self, reason: FailReason) {
        if let Some((_, counter)) = self.failed.iter().find(|(r, _)| *r == reason) {
            counter.inc();
        }
    }

    /// Records a circuit breaker state change.
    pub fn breaker_changed(&self, to: BreakerState) {
        self.breaker_state.set(match to {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        });
        self.breaker_transitions
            .get_or_create(&ToLabel { to: to.label() })
            .inc();
    }

    /// Counts a server-side close by code.
    pub fn closed_with(&self, code: u16) {
        self.closes.get_or_create(&CodeLabel { code }).inc();
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

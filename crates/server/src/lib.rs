//! The `switchyard` server: configuration, the HTTP API and its OpenAPI document, the WebSocket
//! transport (main and seed-compatible endpoints), the demo page, logging, and the serve loop with
//! draining. The engine itself lives in `switchyard-core`.

pub mod api;
pub mod app;
pub mod config;
pub mod logging;
pub mod serve;
pub mod ws;

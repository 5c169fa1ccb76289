//! A small HTTP/1.1 client for the Switchyard HTTP API (JSON in, JSON out), on hyper.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Calls one node's HTTP API.
#[derive(Debug, Clone)]
pub struct Http {
    addr: SocketAddr,
    api_key: Option<String>,
    timeout: Duration,
}

/// A response: status and body (parsed as JSON when it is JSON, else a JSON string).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub text: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http {
            addr,
            api_key: None,
            timeout: crate::DEFAULT_TIMEOUT,
        }
    }

    pub fn with_api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_string());
        self
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
        self.call(Method::POST, path, Some(body.to_string())).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Response> {
        self.call(Method::DELETE, path, None).await
    }

    /// Sends a request with an arbitrary body (for tests of bad input).
    pub async fn call(&self, method: Method, path: &str, body: Option<String>) -> anyhow::Result<Response> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.call_untimed(method, path, body))
            .await
            .map_err(|_| anyhow!("{path}: no response within {timeout:?}"))?
    }

    async fn call_untimed(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Response> {
        let stream = crate::tcp_connect(self.addr, None).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(key) = &self.api_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("request to {path} failed"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        Ok(Response { status, body, text })
    }

    /// Creates a session and returns its id.
    pub async fn create_session(&self, user_id: &str) -> anyhow::Result<String> {
        let response = self
            .post("/api/sessions", &serde_json::json!({ "user_id": user_id }))
            .await?;
        if response.status != StatusCode::CREATED {
            anyhow::bail!("creating a session failed: {} {}", response.status, response.text);
        }
        response.body["session_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no session_id in {}", response.text))
    }
}

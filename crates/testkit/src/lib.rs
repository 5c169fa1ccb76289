//! Test support shared by the workspace's integration tests: real `redis-server` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod redis;

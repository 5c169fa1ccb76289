//! Switchyard's engine, independent of HTTP and Redis: the per-node [`hub::Hub`] (rooms, users and
//! their local connections), bounded per-connection queues, the backend traits with their in-memory
//! implementations, and the transport-independent request handling of [`node::Node`].

pub mod backend;
pub mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod conn;
pub mod frames;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod shard;

pub use tungstenite::Utf8Bytes;

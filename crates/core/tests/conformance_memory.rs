//! The backend conformance suite against the memory backend.

use switchyard_core::backend::memory::MemoryBackend;

#[tokio::test]
async fn memory_backend_conforms() {
    switchyard_core::conformance::run_all(|settings| async move { MemoryBackend::backends(settings) }).await;
}

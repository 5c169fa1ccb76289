//! The backend conformance suite against a real standalone Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use switchyard_core::metrics::Metrics;
use switchyard_redis::{RedisBackend, RedisSettings, Topology};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() {
    let redis = switchyard_testkit::redis::RedisProcess::start().await;
    let stop = CancellationToken::new();
    let url = redis.url();
    switchyard_core::conformance::run_all(|settings| {
        let url = url.clone();
        let stop = stop.clone();
        async move {
            let mut redis_settings = RedisSettings::new(Topology::Standalone(url));
            redis_settings.key_prefix = format!("t{:08x}:", rand::random::<u32>());
            RedisBackend::connect(settings, redis_settings, Arc::new(Metrics::new()), stop)
                .await
                .unwrap()
                .backends()
        }
    })
    .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_backend_conforms() {
    let cluster = switchyard_testkit::redis::RedisCluster::start().await;
    let stop = CancellationToken::new();
    let urls = cluster.urls();
    switchyard_core::conformance::run_all(|settings| {
        let urls = urls.clone();
        let stop = stop.clone();
        async move {
            let mut redis_settings = RedisSettings::new(Topology::Cluster(urls));
            redis_settings.key_prefix = format!("t{:08x}:", rand::random::<u32>());
            RedisBackend::connect(settings, redis_settings, Arc::new(Metrics::new()), stop)
                .await
                .unwrap()
                .backends()
        }
    })
    .await;
    stop.cancel();
}

//! gRPC plumbing: a server with `grpc.health.v1` and reflection beside the
//! service's own API, and the one place internal errors become a `Status`.
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

/// Serves `routes` plus health and reflection on `addr` until `shutdown`.
/// `descriptors` are encoded `FileDescriptorSet`s of the API, for reflection.
pub async fn serve(
    addr: SocketAddr,
    routes: Routes,
    service_names: &[&str],
    descriptors: &[&[u8]],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for set in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(set);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
    }
    let incoming =
        TcpIncoming::bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "gRPC API listening");
    tonic::transport::Server::builder()
        .add_routes(routes)
        .add_service(health_service)
        .add_service(v1.build_v1()?)
        .add_service(v1alpha.build_v1alpha()?)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Logs an internal failure and answers the client without its details.
pub fn internal(error: impl std::fmt::Display) -> tonic::Status {
    tracing::error!(%error, "request failed");
    tonic::Status::internal("internal error; the server log has the details")
}

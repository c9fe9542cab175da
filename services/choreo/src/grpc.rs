//! gRPC plumbing: a server with `grpc.health.v1` and reflection beside the
//! service's own API, and the one place internal errors become a `Status`.
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

/// HTTP/2 streams one client connection may open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The longest a request may take to be answered.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to a service's gRPC API at `addr`: `https://` speaks TLS and
/// trusts the certificate authority `ca_cert` (PEM), `http://` does not.
pub fn endpoint(addr: &str, ca_cert: Option<&[u8]>) -> anyhow::Result<tonic::transport::Endpoint> {
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| anyhow::anyhow!("{addr} is not a URL: {e}"))?;
    if !addr.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca_cert = ca_cert.ok_or_else(|| {
        anyhow::anyhow!("{addr} speaks TLS: give the certificate authority to trust (--ca-cert)")
    })?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_cert));
    endpoint
        .tls_config(tls)
        .map_err(|e| anyhow::anyhow!("TLS for {addr}: {e}"))
}

/// Serves `routes` plus health and reflection on `addr` until `shutdown`.
/// `descriptors` are encoded `FileDescriptorSet`s of the API, for reflection.
pub async fn serve(
    addr: SocketAddr,
    routes: Routes,
    service_names: &[&str],
    descriptors: &[&[u8]],
    policy: crate::auth::Policy,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let policy = std::sync::Arc::new(policy);
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
    // Reflection lists what this port serves, not every API in the descriptors.
    for name in service_names.iter().copied().chain([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        v1 = v1.with_service_name(name);
        v1alpha = v1alpha.with_service_name(name);
    }
    let incoming = TcpIncoming::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?
        // Small gRPC responses go out at once instead of waiting on the peer's delayed ACK.
        .with_nodelay(Some(true));
    tracing::info!(%addr, tls = tls.is_some(), "gRPC API listening");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS_CERT / TLS_KEY: {e}"))?;
    }
    server
        // Bounded: streams per connection, requests in flight per connection,
        // and how long a request may take to answer (a watch's stream itself
        // runs on after its answer has begun).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .timeout(REQUEST_TIMEOUT)
        .trace_fn(request_span)
        .layer(tower::layer::layer_fn(|inner| CountRequests { inner }))
        .layer(tower::layer::layer_fn(move |inner| {
            crate::auth::Authorize {
                inner,
                policy: policy.clone(),
            }
        }))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(v1.build_v1()?)
        .add_service(v1alpha.build_v1alpha()?)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// A database time as a protobuf `Timestamp`, for API responses.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Why a request failed, in words a service's API code uses. The one place a
/// service's errors become a gRPC [`tonic::Status`]: a request's own mistakes
/// keep their message; internal failures are logged and the client is told
/// only that the server log has them (no SQL, no stack).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ApiError::NotFound(m) => tonic::Status::not_found(m),
            ApiError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ApiError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m),
            internal @ (ApiError::Database(_) | ApiError::Internal(_)) => {
                tracing::error!(error = %internal, "request failed");
                tonic::Status::internal("internal error; the server log has the details")
            }
        }
    }
}

/// One span per request, a child of the caller's `traceparent` when it sends one.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", otel.name = %request.uri().path(), otel.kind = "server");
    if let Some(traceparent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        crate::telemetry::set_parent(&span, traceparent);
    }
    span
}

/// Counts requests by method and status code (`saga_grpc_requests_total`).
/// Handler errors travel as trailers-only responses, so their code is in the
/// headers; a response without one is a success.
#[derive(Clone)]
struct CountRequests<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for CountRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                    .unwrap_or_else(|| "Ok".to_owned()),
                Err(_) => "TransportError".to_owned(),
            };
            // A path nobody serves is counted as "other": callers choose
            // paths, and each new label value would be a new series.
            let method = if code == "Unimplemented" {
                "other".to_owned()
            } else {
                method
            };
            metrics::counter!("saga_grpc_requests_total", "method" => method, "code" => code)
                .increment(1);
            response
        })
    }
}

//! The saga console: a web server that shows every order's saga across the
//! four services, live, and lets an operator cancel an order, replay a dead
//! letter or set stock. It keeps no state of its own and never touches a
//! database: every page is built from the services' gRPC APIs (and, for the
//! health page, their metrics endpoints) when it is asked for.
pub mod backend;
pub mod chart;
pub mod config;
pub mod diagram;
pub mod health;
pub mod html;
pub mod pages;
pub mod swimlane;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

pub use config::Config;

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    pub backend: backend::Backend,
    pub history: health::History,
    pub sample_every: Duration,
    pub access: Arc<web::Access>,
}

/// Serves the console until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let password = config.password()?;
    config.check_exposure(password.as_deref())?;
    let backend = backend::Backend::new(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sample_every = Duration::from_secs(config.health_sample_secs.max(1));
    let history = health::History::default();
    let sampler = tokio::spawn(health::sample(
        backend.clone(),
        history.clone(),
        sample_every,
        shutdown.clone(),
    ));
    let app = App {
        backend,
        history,
        sample_every,
        access: Arc::new(web::Access::new(config.addr, password)),
    };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "console listening: open http://{addr}/");
    tokio::spawn(choreo::runtime::cancel_on_signal(shutdown.clone()));
    axum::serve(listener, web::router(app))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    shutdown.cancel();
    let _ = sampler.await;
    Ok(())
}

//! choreo: the platform library for choreographed sagas on NATS JetStream.
//!
//! A service built on it writes business rules only: a [`Handler`] that turns
//! one consumed, already decoded event into row changes and outgoing events
//! inside one transaction (with [`step`] for a compensable step), and a gRPC
//! API. Everything else lives here: the declared [`choreography`] that
//! subscriptions and checks derive from, the versioned [`Envelope`], the
//! transactional [`outbox`] and its [`relay`], the [`inbox`] step, the
//! [`consumer`] loop, [`dead_letters`], the compensation [`barrier`], stream
//! and consumer [`provision`]ing, retention [`cleanup`], and the [`runtime`]
//! that wires config, telemetry, gRPC and shutdown.

pub mod auth;
pub mod barrier;
pub mod batch;
pub mod broker_access;
pub mod choreography;
pub mod cleanup;
pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod envelope;
pub mod grpc;
pub mod handler;
pub mod inbox;
pub mod outbox;
pub mod provision;
pub mod pull;
pub mod relay;
pub mod runtime;
pub mod step;
pub mod telemetry;

/// Generated from proto/choreo/v1 (the envelope and the dead-letter API).
pub mod proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/choreo.v1.rs"));
}

/// Encoded descriptor set of proto/choreo/v1, for gRPC reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/choreo_descriptor.bin"));

pub use choreography::Choreography;
pub use config::Config;
pub use envelope::{Envelope, EventPayload, Reject};
pub use handler::{Decode, Effect, HandleError, Handler};
pub use outbox::Outbox;
pub use runtime::{Ports, Service};

/// The transaction a handler writes its effects and outgoing events in.
pub type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

//! Hermetic infrastructure for tests, the demo and the chaos suite: its own
//! `nats-server -js` and PostgreSQL cluster on free loopback ports in temporary
//! folders, and the service binaries as child processes, each of which can be
//! killed and restarted. Everything is stopped on `Drop`, also when a test
//! panics. Given `NATS_URL` / `DATABASE_URL` it uses those servers instead
//! (then they cannot be killed).
mod nats;
mod postgres;
mod process;
mod proxy;

pub use nats::CONFIG as NATS_CONFIG;
pub use nats::Nats;
pub use postgres::INIT_SCRIPT as POSTGRES_INIT_SCRIPT;
pub use postgres::Postgres;
pub use process::{ServiceProcess, bin_dir};
pub use proxy::{Mode, Proxy};

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listened on 127.0.0.1:{port} within {timeout:?}")
}

/// A PostgreSQL server (or the one `DATABASE_URL` names) and a fresh database on it.
pub async fn fresh_database() -> anyhow::Result<(Postgres, String)> {
    let postgres = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = postgres.fresh_database().await?;
    Ok((postgres, url))
}

/// Both servers a service needs.
pub struct Infra {
    pub nats: Nats,
    pub postgres: Postgres,
}

impl Infra {
    /// Starts (or, with `NATS_URL` / `DATABASE_URL` set, adopts) NATS and PostgreSQL.
    pub fn start() -> anyhow::Result<Self> {
        Ok(Infra {
            nats: Nats::start()?,
            postgres: Postgres::start()?,
        })
    }

    /// Starts both servers of its own, whatever the environment says: for
    /// tests that kill them.
    pub fn start_own() -> anyhow::Result<Self> {
        Ok(Infra {
            nats: Nats::start_own()?,
            postgres: Postgres::start_own()?,
        })
    }
}

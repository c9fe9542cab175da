//! A `nats-server -js` on a free port with its store in a temporary folder.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, wait_for_port};

/// deploy/nats.conf, shared with docker-compose, built in (so the binaries
/// need no path to the source tree at run time).
pub const CONFIG: &str = include_str!("../../../deploy/nats.conf");

pub struct Nats {
    url: String,
    port: u16,
    monitor_port: u16,
    store: Option<TempDir>,
    child: Option<Child>,
}

impl Nats {
    /// Starts a fresh server, or adopts the one `NATS_URL` names.
    pub fn start() -> anyhow::Result<Self> {
        match std::env::var("NATS_URL") {
            Ok(url) => Ok(Nats {
                url,
                port: 0,
                monitor_port: 0,
                store: None,
                child: None,
            }),
            Err(_) => Self::start_own(),
        }
    }

    /// Starts a fresh server whatever the environment says (for tests that kill it).
    pub fn start_own() -> anyhow::Result<Self> {
        let mut nats = Self::with_ports(free_port(), free_port())?;
        nats.restart()?;
        Ok(nats)
    }

    /// A server not yet started, for these ports and a fresh store.
    pub(crate) fn with_ports(port: u16, monitor_port: u16) -> anyhow::Result<Self> {
        Ok(Nats {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            monitor_port,
            store: Some(tempfile::Builder::new().prefix("saga-nats-").tempdir()?),
            child: None,
        })
    }

    /// The port the server listens on (0 when external).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn store(&self) -> anyhow::Result<&TempDir> {
        self.store.as_ref().ok_or_else(|| {
            anyhow::anyhow!("NATS at {} is external and cannot be controlled", self.url)
        })
    }

    /// SIGKILL: the broker dies mid-flow, as in a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.store()?;
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and store (after [`Nats::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let store = self.store()?.path().to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.join("nats.log"))?;
        std::fs::write(store.join("nats.conf"), CONFIG)?;
        // The same configuration docker-compose mounts; the flags put it on
        // our own port, monitoring port and store.
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(store.join("nats.conf"))
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string(), "-sd"])
            .arg(store.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot start nats-server (is it installed? see README): {e}")
            })?;
        self.child = Some(child);
        self.wait_until_listening(Duration::from_secs(15))
    }

    /// Waits for the client port; if the server exits first (a port taken,
    /// a bad store), says so with the end of its log instead of waiting out
    /// the timeout.
    fn wait_until_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if wait_for_port(self.port, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                anyhow::bail!(
                    "nats-server on port {} exited ({status}) before listening; its log ends:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
        }
        anyhow::bail!(
            "nats-server did not listen on 127.0.0.1:{} within {timeout:?}; its log ends:\n{}",
            self.port,
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        let Some(store) = self.store.as_ref() else {
            return String::new();
        };
        let log = std::fs::read_to_string(store.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

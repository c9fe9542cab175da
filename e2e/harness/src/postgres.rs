//! A PostgreSQL cluster made with `initdb` in a temporary folder, run with
//! `pg_ctl` on a free port. PostgreSQL refuses to run as root, so as root the
//! commands run as the `postgres` account over a folder it owns.
use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::Connection;
use tempfile::TempDir;

use crate::free_port;

/// deploy/postgres-init.sql, shared with docker-compose, built in. psql runs
/// it with one variable per role (`<role>_password`).
pub const INIT_SCRIPT: &str = include_str!("../../../deploy/postgres-init.sql");

pub struct Postgres {
    admin_url: String,
    port: u16,
    dir: Option<TempDir>,
    running: bool,
    /// Whether the server fsyncs its commits (off for tests: they run on
    /// throwaway folders; on for the benchmark, as a real server runs).
    durable: bool,
    /// More server settings (`-c name=value ...`) for our own server,
    /// beside HARNESS_POSTGRES_OPTIONS's.
    settings: String,
}

fn bin(name: &str) -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(name));
    if let Some(path) = from_pg_config.filter(|p| p.exists()) {
        return path;
    }
    // Debian keeps the server binaries in a versioned folder, off PATH.
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    versioned.sort();
    versioned.pop().unwrap_or_else(|| PathBuf::from(name))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool, as the `postgres` account when we are root.
fn run_pg(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let program = bin(tool);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    let output = command.args(args).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run {} (is the PostgreSQL server installed? see README): {e}",
            program.display()
        )
    })?;
    if !output.status.success() {
        anyhow::bail!(
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl Postgres {
    /// Creates and starts a fresh cluster, or adopts the server `DATABASE_URL` names.
    pub fn start() -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) => Ok(Postgres {
                admin_url: url,
                port: 0,
                dir: None,
                running: true,
                durable: true,
                settings: String::new(),
            }),
            Err(_) => Self::start_own(),
        }
    }

    /// Creates and starts a fresh cluster whatever the environment says (for tests that kill it).
    pub fn start_own() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("saga-pg-").tempdir()?;
        let data = dir.path().join("data");
        // Passwords over TCP, as in docker-compose (scram); trust only on the
        // folder's own socket, which the harness does not use.
        let password_file = dir.path().join("superuser-password");
        std::fs::write(&password_file, crate::password("postgres"))?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()?;
            anyhow::ensure!(status.success(), "chown of {} failed", dir.path().display());
        }
        run_pg(
            "initdb",
            &[
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                path_str(&password_file)?,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
                path_str(&data)?,
            ],
        )?;
        let port = free_port();
        let mut pg = Postgres {
            admin_url: format!(
                "postgres://postgres:{}@127.0.0.1:{port}/postgres",
                crate::password("postgres")
            ),
            port,
            dir: Some(dir),
            running: false,
            durable: false,
            settings: String::new(),
        };
        pg.restart()?;
        Ok(pg)
    }

    fn dir(&self) -> anyhow::Result<&Path> {
        self.dir.as_ref().map(|d| d.path()).ok_or_else(|| {
            anyhow::anyhow!(
                "PostgreSQL at {} is external and cannot be controlled",
                self.admin_url
            )
        })
    }

    /// A fresh cluster of our own that fsyncs every commit (`fsync` and
    /// `synchronous_commit` on, PostgreSQL's defaults), for the benchmark.
    pub fn start_own_durable() -> anyhow::Result<Self> {
        Self::start_own_durable_with("")
    }

    /// The same, with more server settings (`-c name=value ...`), kept
    /// for its restarts too.
    pub fn start_own_durable_with(settings: &str) -> anyhow::Result<Self> {
        let mut pg = Self::start_own()?;
        pg.durable = true;
        pg.settings = settings.to_owned();
        pg.kill()?;
        pg.restart()?;
        Ok(pg)
    }

    /// Whether commits are fsynced (see [`Postgres::start_own_durable`]).
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The postmaster's process id (its children are the backends).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = self
            .dir
            .as_ref()?
            .path()
            .join("data")
            .join("postmaster.pid");
        std::fs::read_to_string(pid_file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts the server (again) on the same port and data folder.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let dir = self.dir()?.to_owned();
        let fsync = if self.durable {
            "-c fsync=on -c synchronous_commit=on"
        } else {
            "-c fsync=off"
        };
        // HARNESS_POSTGRES_OPTIONS adds server settings, e.g. for profiling:
        // "-c shared_preload_libraries=pg_stat_statements".
        let extra = std::env::var("HARNESS_POSTGRES_OPTIONS").unwrap_or_default();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=400 {fsync} {} {extra}",
            self.port,
            path_str(&dir)?,
            self.settings
        );
        run_pg(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                path_str(&dir.join("data"))?,
                "-l",
                path_str(&dir.join("postgres.log"))?,
                "-o",
                &options,
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// Immediate-mode stop: no checkpoint, connections cut, as in a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let data = self.dir()?.join("data");
        run_pg(
            "pg_ctl",
            &["stop", "-m", "immediate", "-w", "-D", path_str(&data)?],
        )?;
        self.running = false;
        Ok(())
    }

    /// Whether this cluster is the harness's own (not adopted from `DATABASE_URL`).
    pub fn is_own(&self) -> bool {
        self.dir.is_some()
    }

    /// Runs deploy/postgres-init.sql (shared with docker-compose) with psql,
    /// giving each `<role>_password` variable it reads the harness's password
    /// for that role ([`crate::password`]).
    pub async fn run_init_script(&self) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::new(bin("psql"));
        command
            .args(["--no-psqlrc", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&self.admin_url)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for role in password_variables(INIT_SCRIPT) {
            command
                .arg("-v")
                .arg(format!("{role}_password={}", crate::password(&role)));
        }
        let mut child = command.spawn().map_err(|e| {
            anyhow::anyhow!("cannot run psql (is the PostgreSQL client installed?): {e}")
        })?;
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(INIT_SCRIPT.as_bytes()).await?;
        }
        let output = child.wait_with_output().await?;
        anyhow::ensure!(
            output.status.success(),
            "deploy/postgres-init.sql failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// The URL of database `name` on this server, logged in as `role` with
    /// the harness's password for it (a role deploy/postgres-init.sql made).
    pub fn database_url_as(&self, role: &str, name: &str) -> String {
        format!(
            "postgres://{role}:{}@127.0.0.1:{}/{name}",
            crate::password(role),
            self.port
        )
    }

    /// Creates a database with a name no other test uses, and returns its URL.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        self.create_database(&format!("t_{}", uuid::Uuid::new_v4().simple()))
            .await
    }

    /// Creates database `name` (if missing) and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?} must be letters, digits and underscores"
        );
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(self.database_url(name))
    }

    /// The port the server listens on (0 when external).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        match self.admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => format!("{}/{name}", self.admin_url),
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow::anyhow!("path {} is not UTF-8", path.display()))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running && self.dir.is_some() {
            let _ = self.kill();
        }
    }
}

/// The roles whose `:'<role>_password'` variable `script` reads.
fn password_variables(script: &str) -> Vec<String> {
    let mut roles: Vec<String> = script
        .split(":'")
        .skip(1)
        .filter_map(|piece| piece.split_once("_password'").map(|(role, _)| role))
        .filter(|role| {
            !role.is_empty() && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

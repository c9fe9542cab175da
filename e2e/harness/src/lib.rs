//! Hermetic infrastructure for tests, the demo and the chaos suite: its own
//! `nats-server -js` and PostgreSQL cluster on free loopback ports in temporary
//! folders, and the service binaries as child processes, each of which can be
//! killed and restarted. Everything is stopped on `Drop`, also when a test
//! panics. Given `NATS_URL` / `DATABASE_URL` it uses those servers instead
//! (then they cannot be killed).
mod cluster;
mod nats;
mod postgres;
mod process;
mod proxy;

pub use cluster::{NatsCluster, node_name};
pub use nats::CONFIG as NATS_CONFIG;
pub use nats::{
    MIN_VERSION as NATS_MIN_VERSION, Nats, parse_version as parse_nats_version,
    password_variables as nats_password_variables,
    relaxed_fsync_config as relaxed_nats_fsync_config, server_program as nats_server_program,
};
pub use postgres::INIT_SCRIPT as POSTGRES_INIT_SCRIPT;
pub use postgres::Postgres;
pub use process::{ServiceProcess, bin_dir};
pub use proxy::{Mode, Proxy};

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The password of login `user` (a NATS user, a PostgreSQL role) on every
/// server this process starts: random per process, so no test depends on a
/// known secret.
pub fn password(user: &str) -> String {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(|| uuid::Uuid::new_v4().simple().to_string());
    format!("{user}-{secret}")
}

/// A loopback port nobody listens on right now, for a server to bind.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), never
/// from it: a port the kernel hands out is also what it picks for the local
/// end of outgoing connections, so between our check and the server's bind
/// any client connection on the machine could take it (a nats-server that
/// then failed to bind made CI fail once). Below the range only another
/// listener can collide, and the pick is random among thousands.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = port_range_below_ephemeral();
    let mut given = GIVEN.lock().expect("port list");
    for _ in 0..1000 {
        let port = rand::random_range(low..high);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && claim_across_processes(port) {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}")
}

/// Claims `port` for this process among every test process on the machine
/// (nextest runs each test in its own): a file named for the port, holding
/// the claimer's pid, created only if absent; a claim whose process is gone
/// is taken over. Without it a port that is free only because a chaos run
/// killed its service could be handed to another test meanwhile, and the
/// restarted service could not listen again (seen once in CI).
fn claim_across_processes(port: u16) -> bool {
    let dir = std::env::temp_dir().join("saga-e2e-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true; // nowhere to claim: the bind check alone
    }
    let path = dir.join(port.to_string());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                use std::io::Write;
                let _ = write!(file, "{}", std::process::id());
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // No pid yet: its claimer is writing it.
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let gone = holder
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
                if !gone {
                    return false;
                }
                let _ = std::fs::remove_file(&path); // its process is gone
            }
            Err(_) => return true,
        }
    }
    false
}

/// Ports between 15000 and the start of the ephemeral range (32768 on Linux
/// by default; read from /proc when it says otherwise).
fn port_range_below_ephemeral() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 16000 {
        (15000, ephemeral_start)
    } else {
        // An unusual range; fall back to what is above it.
        (61000, 65000)
    }
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

/// Polls `check` every 100 ms until it holds; panics naming `what` after
/// `timeout`. For tests that wait on a real system to get somewhere.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A PostgreSQL server (or the one `DATABASE_URL` names) and a fresh database on it.
pub async fn fresh_database() -> anyhow::Result<(Postgres, String)> {
    let postgres = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = postgres.fresh_database().await?;
    Ok((postgres, url))
}

/// Whether the row of `table` for the order `order_id` was written by the
/// first statement of its transaction (`cmin` counts the statements of the
/// transaction that wrote a row). A consumed event's effect applied alone
/// is that first statement, together with its inbox insert; in a
/// transaction the inbox insert comes first and the effect later.
pub async fn written_by_first_statement(pool: &sqlx::PgPool, table: &str, order_id: &str) -> bool {
    let sql = format!("SELECT cmin::text = '0' FROM {table} WHERE order_id = $1::uuid");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(order_id)
        .fetch_one(pool)
        .await
        .expect("the row's cmin")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = port_range_below_ephemeral();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        for port in &ports {
            assert!((low..high).contains(port), "{port} outside {low}..{high}");
            TcpListener::bind(("127.0.0.1", *port)).expect("still free");
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    }

    #[test]
    fn a_port_claimed_by_a_live_process_is_refused_and_a_dead_ones_taken_over() {
        let port = free_port();
        // Claimed by this process: another test process would be refused.
        assert!(!claim_across_processes(port));
        // A claim left by a process that is gone (no such pid) is taken over.
        let path = std::env::temp_dir()
            .join("saga-e2e-ports")
            .join(port.to_string());
        std::fs::write(&path, u32::MAX.to_string()).unwrap();
        assert!(claim_across_processes(port));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn nats_server_versions_are_read_and_old_ones_refused() {
        assert_eq!(parse_nats_version("nats-server: v2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_nats_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert!(parse_nats_version("nats-server: v2.9.10").unwrap() < NATS_MIN_VERSION);
        assert!(parse_nats_version("nats-server: v2.12.0").unwrap() < NATS_MIN_VERSION);
        assert!(parse_nats_version("nats-server: v2.14.0").unwrap() >= NATS_MIN_VERSION);
        assert_eq!(parse_nats_version("command not found"), None);
        // The server the tests run is new enough.
        let program = nats_server_program().expect("a current nats-server");
        let out = std::process::Command::new(program)
            .arg("--version")
            .output()
            .unwrap();
        let version = parse_nats_version(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert!(version >= NATS_MIN_VERSION, "{version:?}");
    }

    #[test]
    fn a_nats_server_too_old_is_refused_with_how_to_get_a_good_one() {
        // Debian's 2.9.10, where installed, stands in for any old server.
        let old = std::path::Path::new("/usr/sbin/nats-server");
        if !old.exists() {
            return;
        }
        let out = std::process::Command::new(old)
            .env("NATS_SERVER", old)
            .arg("--version")
            .output()
            .unwrap();
        let found = parse_nats_version(&String::from_utf8_lossy(&out.stdout)).unwrap();
        if found >= NATS_MIN_VERSION {
            return;
        }
        let refused = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::check_the_server_named_by_nats_server",
                "--include-ignored",
            ])
            .env("NATS_SERVER", old)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&refused.stdout).to_string()
            + &String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{said}");
        assert!(
            said.contains("is nats-server 2.9.10; this project needs 2.14.0 or newer"),
            "{said}"
        );
        assert!(said.contains("pip install --require-hashes"), "{said}");
    }

    /// Run by the test above in a process of its own, with NATS_SERVER set.
    #[test]
    #[ignore]
    fn check_the_server_named_by_nats_server() {
        nats_server_program().unwrap();
    }

    #[test]
    fn a_nats_server_that_cannot_bind_says_why_at_once() {
        // Something else holds its monitoring port: the server exits, and the
        // harness reports its log instead of waiting out the timeout.
        let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = squatter.local_addr().expect("addr").port();
        let started = Instant::now();
        let mut nats = Nats::with_ports(free_port(), taken).expect("store");
        let error = nats.restart().expect_err("the port is taken");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let message = format!("{error:#}");
        assert!(message.contains("exited"), "{message}");
        assert!(message.contains("address already in use"), "{message}");
    }
}

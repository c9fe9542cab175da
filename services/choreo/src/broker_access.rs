//! Who may do what on NATS, derived from the choreography: one user per
//! service, allowed to publish exactly the events it produces (and the
//! platform's stuck reports), to read the info of each stream it reads and
//! pull from and ack its own durable consumer there, and to receive replies
//! under its own inbox prefix. Creating or changing the streams and the
//! consumers is the admin's.
//!
//! The users block is written into deploy/nats.conf between markers
//! (`cargo run -p contracts --bin saga-generate`); a test fails when it is
//! stale. Passwords are never in the file: each is read from the
//! environment of nats-server (`NATS_<USER>_PASSWORD`), which refuses to
//! start when one is missing.
use std::fmt::Write as _;

use crate::choreography::Choreography;
use crate::provision::{STUCK_STREAM, sources_of, stream_name, streams};
use crate::runtime::inbox_prefix;

/// The user that provisions JetStream and operates the system.
pub const ADMIN_USER: &str = "admin";

/// Marks the generated users block in a NATS configuration file.
pub const USERS_BEGIN: &str = "# users: generated from the choreography by `cargo run -p contracts --bin saga-generate`; do not edit";
pub const USERS_END: &str = "# end of generated users";

/// The environment variable nats-server reads `user`'s password from.
pub fn password_variable(user: &str) -> String {
    format!("NATS_{}_PASSWORD", user.to_ascii_uppercase())
}

/// The subjects service `service` may publish to, for the streams named
/// from `stream` ([`crate::provision::streams`]) whose events go to
/// `<prefix>.<event type>`.
pub fn publish_allowed(
    choreography: &Choreography,
    service: &str,
    stream: &str,
    prefix: &str,
) -> Vec<String> {
    // What it writes: the subjects of its own stream and of the stuck reports'.
    let written = [
        stream_name(stream, service),
        stream_name(stream, STUCK_STREAM),
    ];
    let mut subjects: Vec<String> = streams(choreography, stream, prefix)
        .into_iter()
        .filter(|spec| written.contains(&spec.name))
        .flat_map(|spec| spec.subjects)
        .collect();
    for (read, _) in sources_of(choreography, service, stream, prefix) {
        let read = read.name;
        subjects.extend([
            format!("$JS.API.STREAM.INFO.{read}"),
            format!("$JS.API.CONSUMER.INFO.{read}.{service}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{read}.{service}"),
            format!("$JS.ACK.{read}.{service}.>"),
        ]);
    }
    subjects
}

/// The `authorization` block for every service of `choreography` and the admin.
pub fn nats_users(choreography: &Choreography, stream: &str, prefix: &str) -> String {
    let quoted = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "authorization {{");
    let _ = writeln!(out, "  users: [");
    let _ = writeln!(
        out,
        "    # The setup step and the operator: everything, JetStream management included."
    );
    let _ = writeln!(
        out,
        "    {{ user: {ADMIN_USER}, password: ${} }}",
        password_variable(ADMIN_USER)
    );
    for service in choreography.services() {
        let _ = writeln!(
            out,
            "    # {service}: publishes its own events, pulls from and acks its own consumers."
        );
        let _ = writeln!(
            out,
            "    {{ user: {service}, password: ${}, permissions: {{",
            password_variable(service)
        );
        let _ = writeln!(
            out,
            "        publish: {{ allow: [{}] }}",
            quoted(&publish_allowed(choreography, service, stream, prefix))
        );
        let _ = writeln!(
            out,
            "        subscribe: {{ allow: [{}] }}",
            quoted(&[format!("{}.>", inbox_prefix(service))])
        );
        let _ = writeln!(out, "    }} }}");
    }
    let _ = writeln!(out, "  ]");
    let _ = writeln!(out, "}}");
    out
}

/// `conf` with the block between [`USERS_BEGIN`] and [`USERS_END`] replaced
/// by `users`; `None` when the markers are missing.
pub fn with_users(conf: &str, users: &str) -> Option<String> {
    let begin = conf.find(USERS_BEGIN)? + USERS_BEGIN.len();
    let end = begin + conf[begin..].find(USERS_END)?;
    Some(format!("{}\n{}{}", &conf[..begin], users, &conf[end..]))
}

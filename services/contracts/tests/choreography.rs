//! The order saga's declaration keeps the choreography's rules, the README
//! shows its current diagram, and a broken declaration says which step breaks
//! which rule.
use choreo::choreography::{Choreography, Event, Meaning, Role, Step, with_diagram};
use contracts::CHOREOGRAPHY;

#[test]
fn the_order_saga_keeps_every_rule() {
    if let Err(violations) = CHOREOGRAPHY.check() {
        panic!("{violations:#?}");
    }
}

#[test]
fn the_readme_shows_the_current_diagram() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let fresh =
        with_diagram(&readme, &CHOREOGRAPHY.mermaid()).expect("the README has the diagram markers");
    assert!(
        fresh == readme,
        "the README's choreography diagram is stale: run `cargo run -p contracts --bin saga-generate`"
    );
}

#[test]
fn the_nats_config_grants_each_service_what_the_declaration_says() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/nats.conf");
    let conf = std::fs::read_to_string(path).unwrap();
    let defaults = choreo::Config::defaults();
    let users = choreo::broker_access::nats_users(
        &CHOREOGRAPHY,
        &defaults.stream,
        &defaults.subject_prefix,
    );
    let fresh = choreo::broker_access::with_users(&conf, &users)
        .expect("deploy/nats.conf has the users markers");
    assert!(
        fresh == conf,
        "deploy/nats.conf's users are stale: run `cargo run -p contracts --bin saga-generate`"
    );
    // Inventory may publish its own events and stuck reports, nobody else's.
    let allowed =
        choreo::broker_access::publish_allowed(&CHOREOGRAPHY, "inventory", "SAGA", "saga");
    for own in [
        "saga.inventory.reserved",
        "saga.inventory.rejected",
        "saga.inventory.released",
        "saga.choreo.stuck",
    ] {
        assert!(
            allowed.iter().any(|s| s == own),
            "{own} missing from {allowed:?}"
        );
    }
    assert!(
        !allowed
            .iter()
            .any(|s| s.contains("notification.sent") || s.contains("order.created"))
    );
    assert!(
        !allowed
            .iter()
            .any(|s| s.contains("CREATE") || s.contains("DELETE")),
        "{allowed:?}"
    );
    // It pulls from its own consumer on the streams of the events it reads
    // (order's and shipping's), and looks at no other stream.
    let pulls: Vec<&str> = allowed
        .iter()
        .filter(|s| s.starts_with("$JS.API.CONSUMER.MSG.NEXT."))
        .map(String::as_str)
        .collect();
    assert_eq!(
        pulls,
        [
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_ORDER.inventory",
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_SHIPPING.inventory"
        ]
    );
    assert!(
        !allowed
            .iter()
            .any(|s| s.contains("SAGA_NOTIFICATION") || s.contains("SAGA_INVENTORY")),
        "{allowed:?}"
    );
}

#[test]
fn each_event_is_stored_in_its_producers_stream_only() {
    let streams = choreo::provision::streams(&CHOREOGRAPHY, "SAGA", "saga");
    let names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "SAGA_ORDER",
            "SAGA_INVENTORY",
            "SAGA_SHIPPING",
            "SAGA_NOTIFICATION",
            "SAGA_STUCK"
        ]
    );
    let mut subjects: Vec<String> = CHOREOGRAPHY
        .events
        .iter()
        .map(|e| format!("saga.{}", e.name))
        .collect();
    subjects.push(format!("saga.{}", choreo::choreography::STUCK));
    for subject in &subjects {
        let holding: Vec<&str> = streams
            .iter()
            .filter(|s| s.holds(subject))
            .map(|s| s.name.as_str())
            .collect();
        let producer = CHOREOGRAPHY
            .event(&subject["saga.".len()..])
            .map_or("STUCK".to_owned(), |e| e.producer.to_ascii_uppercase());
        assert_eq!(holding, [format!("SAGA_{producer}")], "{subject}");
    }
    // Each service's consumers filter, together, exactly its subscription.
    for service in CHOREOGRAPHY.services() {
        let mut filtered: Vec<String> =
            choreo::provision::sources_of(&CHOREOGRAPHY, service, "SAGA", "saga")
                .into_iter()
                .flat_map(|(_, filter)| filter)
                .collect();
        filtered.sort();
        assert_eq!(
            filtered,
            CHOREOGRAPHY.subscription(service).subjects("saga"),
            "{service}"
        );
    }
}

#[test]
fn the_chains_walk_back_in_reverse_from_each_failure_and_the_cancel() {
    use choreo::choreography::{Chain, Entry};
    let chain = |entry, events: &[&'static str], completes| Chain {
        entry,
        events: events.to_vec(),
        completes,
    };
    assert_eq!(
        CHOREOGRAPHY.chains(),
        vec![
            chain(
                Entry::HappyPath,
                &[
                    "order.created",
                    "inventory.reserved",
                    "shipping.scheduled",
                    "notification.sent"
                ],
                true
            ),
            chain(Entry::Fails("reserve"), &["inventory.rejected"], false),
            chain(
                Entry::Fails("ship"),
                &["shipping.failed", "inventory.released"],
                false
            ),
            chain(
                Entry::Fails("notify"),
                &[
                    "notification.failed",
                    "shipping.cancelled",
                    "inventory.released"
                ],
                false
            ),
            chain(
                Entry::Cancelled,
                &[
                    "order.cancelled",
                    "notification.cancelled",
                    "shipping.cancelled",
                    "inventory.released"
                ],
                false
            ),
        ]
    );
}

#[test]
fn subscriptions_come_from_the_declaration() {
    let of = |s| CHOREOGRAPHY.subscription(s).event_types;
    assert_eq!(
        of("inventory"),
        ["order.created", "shipping.failed", "shipping.cancelled"]
    );
    assert_eq!(
        of("shipping"),
        [
            "inventory.reserved",
            "notification.failed",
            "notification.cancelled"
        ]
    );
    assert_eq!(
        of("notification"),
        ["shipping.scheduled", "order.cancelled"]
    );
    let order = of("order");
    let others = CHOREOGRAPHY
        .events
        .iter()
        .filter(|e| e.producer != "order")
        .count();
    assert_eq!(
        order.len(),
        others + 1,
        "order observes every event the others write, and stuck reports"
    );
    assert!(
        !order.iter().any(|t| t.starts_with("order.")),
        "its own it records as it writes them"
    );
    assert!(order.iter().any(|t| t == "choreo.stuck"));
    assert_eq!(
        CHOREOGRAPHY.subscription("inventory").subjects("saga"),
        [
            "saga.order.created",
            "saga.shipping.cancelled",
            "saga.shipping.failed"
        ]
    );
}

#[test]
fn each_step_claims_its_barrier_row_on_its_trigger_and_its_compensations() {
    use choreo::barrier::Claim::{Action, Compensation};
    let claims = |s| {
        CHOREOGRAPHY
            .subscription(s)
            .claims
            .into_iter()
            .collect::<Vec<_>>()
    };
    let owned = |pairs: &[(&str, choreo::barrier::Claim)]| {
        pairs
            .iter()
            .map(|(t, c)| ((*t).to_owned(), *c))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        claims("inventory"),
        owned(&[
            ("order.created", Action("reserve")),
            ("shipping.cancelled", Compensation("reserve")),
            ("shipping.failed", Compensation("reserve")),
        ])
    );
    assert_eq!(
        claims("notification"),
        owned(&[
            ("order.cancelled", Compensation("notify")),
            ("shipping.scheduled", Action("notify")),
        ])
    );
    assert!(claims("order").is_empty(), "order owns no step");
}

#[test]
fn each_event_means_what_its_place_in_the_chain_says() {
    let m = |t| CHOREOGRAPHY.meaning(t);
    assert_eq!(m("order.created"), Meaning::Started);
    assert_eq!(
        m("inventory.reserved"),
        Meaning::Succeeded {
            step: "reserve",
            last: false
        }
    );
    assert_eq!(
        m("notification.sent"),
        Meaning::Succeeded {
            step: "notify",
            last: true
        }
    );
    assert_eq!(
        m("inventory.rejected"),
        Meaning::Failed {
            step: "reserve",
            first: true
        }
    );
    assert_eq!(
        m("shipping.failed"),
        Meaning::Failed {
            step: "ship",
            first: false
        }
    );
    assert_eq!(
        m("inventory.released"),
        Meaning::Compensated {
            step: "reserve",
            first: true
        }
    );
    assert_eq!(m("order.cancelled"), Meaning::CancelRequested);
    assert_eq!(m("something.new"), Meaning::Unknown);
}

/// A two-step saga, declared correctly; each test below breaks one rule.
const A: Step = Step {
    name: "a",
    owner: "alpha",
    trigger: "saga.started",
    success: "a.done",
    failure: "a.failed",
    compensated_by: &["b.failed", "b.undone"],
    compensation: "a.undone",
};
const B: Step = Step {
    name: "b",
    owner: "beta",
    trigger: "a.done",
    success: "b.done",
    failure: "b.failed",
    compensated_by: &["saga.cancelled"],
    compensation: "b.undone",
};
const fn event(
    name: &'static str,
    producer: &'static str,
    consumers: &'static [(&'static str, Role)],
) -> Event {
    Event {
        name,
        producer,
        payload: "test",
        versions: &[1],
        consumers,
    }
}
const EVENTS: &[Event] = &[
    event("saga.started", "origin", &[("alpha", Role::Forward)]),
    event("saga.cancelled", "origin", &[("beta", Role::Compensation)]),
    event("a.done", "alpha", &[("beta", Role::Forward)]),
    event("a.failed", "alpha", &[("origin", Role::Ends)]),
    event("a.undone", "alpha", &[("origin", Role::Ends)]),
    event("b.done", "beta", &[("origin", Role::Ends)]),
    event("b.failed", "beta", &[("alpha", Role::Failure)]),
    event("b.undone", "beta", &[("alpha", Role::Compensation)]),
];
const fn saga(events: &'static [Event], steps: &'static [Step]) -> Choreography {
    Choreography {
        start: "saga.started",
        cancel: "saga.cancelled",
        events,
        steps,
        stuck_reports_to: &[],
    }
}

/// The one violation `c` has; fails if it has none or several.
fn only_violation(c: Choreography) -> String {
    let violations = c
        .check()
        .expect_err("the broken declaration must fail its check");
    assert_eq!(violations.len(), 1, "{violations:#?}");
    violations[0].to_string()
}

#[test]
fn a_correct_small_saga_passes() {
    saga(EVENTS, &[A, B]).check().unwrap();
}

#[test]
fn an_event_declared_twice_has_two_producers() {
    const TWICE: &[Event] = &[
        event("saga.started", "origin", &[("alpha", Role::Forward)]),
        event("saga.cancelled", "origin", &[("beta", Role::Compensation)]),
        event("a.done", "alpha", &[("beta", Role::Forward)]),
        event("a.failed", "alpha", &[("origin", Role::Ends)]),
        event("a.undone", "alpha", &[("origin", Role::Ends)]),
        event("b.done", "beta", &[("origin", Role::Ends)]),
        event("b.failed", "beta", &[("alpha", Role::Failure)]),
        event("b.undone", "beta", &[("alpha", Role::Compensation)]),
        event("b.done", "alpha", &[("origin", Role::Ends)]),
    ];
    let message = only_violation(saga(TWICE, &[A, B]));
    assert_eq!(
        message,
        "b.done: every event has exactly one producer: declared 2 times"
    );
}

#[test]
fn a_consumed_event_nobody_produces_is_named() {
    const B_LISTENS_TO_A_GHOST: Step = Step {
        compensated_by: &["saga.cancelled", "ghost.event"],
        ..B
    };
    let violations = saga(EVENTS, &[A, B_LISTENS_TO_A_GHOST])
        .check()
        .unwrap_err();
    let text: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    assert!(
        text.contains(&"b: every consumed event is produced by someone: its compensated by event ghost.event is not declared, so nobody produces it".to_owned()),
        "{text:#?}"
    );
}

#[test]
fn a_step_without_a_compensation_is_named() {
    const B_CANNOT_BE_UNDONE: Step = Step {
        compensated_by: &[],
        ..B
    };
    let violations = saga(EVENTS, &[A, B_CANNOT_BE_UNDONE]).check().unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| v.subject == "b" && v.rule == "every step that does work has a compensation"),
        "{violations:#?}"
    );
}

#[test]
fn compensation_out_of_reverse_order_is_named() {
    // a is undone by the cancel, as if it came last: the chain would skip b.
    const A_UNDONE_BY_CANCEL: Step = Step {
        compensated_by: &["saga.cancelled"],
        ..A
    };
    const EVENTS_A_HEARS_CANCEL: &[Event] = &[
        event("saga.started", "origin", &[("alpha", Role::Forward)]),
        event(
            "saga.cancelled",
            "origin",
            &[("beta", Role::Compensation), ("alpha", Role::Compensation)],
        ),
        event("a.done", "alpha", &[("beta", Role::Forward)]),
        event("a.failed", "alpha", &[("origin", Role::Ends)]),
        event("a.undone", "alpha", &[("origin", Role::Ends)]),
        event("b.done", "beta", &[("origin", Role::Ends)]),
        event("b.failed", "beta", &[("alpha", Role::Failure)]),
        event("b.undone", "beta", &[("alpha", Role::Compensation)]),
    ];
    let message = only_violation(saga(EVENTS_A_HEARS_CANCEL, &[A_UNDONE_BY_CANCEL, B]));
    assert_eq!(
        message,
        "a: compensation runs in reverse order of the forward chain: compensated by [\"saga.cancelled\"], but the reverse chain reaches it through [\"b.failed\", \"b.undone\"]"
    );
}

#[test]
fn a_chain_that_does_not_end_at_the_terminal_event_is_named() {
    const NOBODY_ENDS_ON_A_UNDONE: &[Event] = &[
        event("saga.started", "origin", &[("alpha", Role::Forward)]),
        event("saga.cancelled", "origin", &[("beta", Role::Compensation)]),
        event("a.done", "alpha", &[("beta", Role::Forward)]),
        event("a.failed", "alpha", &[("origin", Role::Ends)]),
        event("a.undone", "alpha", &[("origin", Role::Observe)]),
        event("b.done", "beta", &[("origin", Role::Ends)]),
        event("b.failed", "beta", &[("alpha", Role::Failure)]),
        event("b.undone", "beta", &[("alpha", Role::Compensation)]),
    ];
    let message = only_violation(saga(NOBODY_ENDS_ON_A_UNDONE, &[A, B]));
    assert_eq!(
        message,
        "a: every chain ends at the one terminal event: nobody consumes a.undone as Ends"
    );
}

#[test]
fn a_step_writing_another_services_event_is_named() {
    const B_CLAIMS_A_DONE: Step = Step {
        success: "b.done",
        owner: "alpha",
        ..B
    };
    let violations = saga(EVENTS, &[A, B_CLAIMS_A_DONE]).check().unwrap_err();
    assert!(
        violations
            .iter()
            .any(|v| v.subject == "b" && v.rule == "a step writes its own outcomes"),
        "{violations:#?}"
    );
}

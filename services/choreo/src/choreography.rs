//! The saga's shape as data: which service produces each event, who consumes
//! it and in what role, and the steps with their compensations. A service's
//! subscription, its consumer's subject filter, the static checks and the
//! diagram are all derived from one [`Choreography`] value; nothing else in
//! the code spells the shape out again.
//!
//! The library holds the types and the rules; the saga's own declaration
//! lives with its contracts (see `contracts::CHOREOGRAPHY`).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::barrier::Claim;

/// The platform's own report that a service keeps failing on an event (see
/// `crate::proto::Stuck`); any service may write it.
pub const STUCK: &str = "choreo.stuck";

/// A whole saga: its events, its steps in forward order, and how it starts,
/// how a cancel enters it, and how it ends.
#[derive(Debug, Clone, Copy)]
pub struct Choreography {
    /// The event that starts a saga (produced by the saga's owner on request).
    pub start: &'static str,
    /// The event that asks for compensation from outside the chain (a customer
    /// cancel, a deadline); it compensates the last step first.
    pub cancel: &'static str,
    /// Every event type of the saga.
    pub events: &'static [Event],
    /// The steps that do work, in forward order.
    pub steps: &'static [Step],
    /// Services that also read the platform's [`STUCK`] reports.
    pub stuck_reports_to: &'static [&'static str],
}

/// One event type.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Dotted name, e.g. `order.created`; also the subject suffix.
    pub name: &'static str,
    /// The service that writes it; the only one allowed to.
    pub producer: &'static str,
    /// The payload message it carries (for people and the diagram).
    pub payload: &'static str,
    /// Schema versions a consumer of this code reads.
    pub versions: &'static [u32],
    /// Who consumes it, and why.
    pub consumers: &'static [(&'static str, Role)],
}

/// Why a service consumes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// It triggers the consumer's step.
    Forward,
    /// A step failed: the consumer compensates its own step.
    Failure,
    /// The step after the consumer's was compensated: the consumer compensates its own.
    Compensation,
    /// The saga ends here for the consumer (its owner records the outcome).
    Ends,
    /// Read for a record (a timeline), no reaction.
    Observe,
}

/// A step that does work and can be undone.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Barrier name of the step, e.g. `reserve`.
    pub name: &'static str,
    /// The service that does the work.
    pub owner: &'static str,
    /// The event that triggers the work.
    pub trigger: &'static str,
    /// Written when the work is done.
    pub success: &'static str,
    /// Written when the work cannot be done.
    pub failure: &'static str,
    /// Events that make the owner undo the work.
    pub compensated_by: &'static [&'static str],
    /// Written when the work was undone (or found never done).
    pub compensation: &'static str,
}

/// One path through the saga (see [`Choreography::chains`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// What starts it.
    pub entry: Entry,
    /// The events it runs through, in order.
    pub events: Vec<&'static str>,
    /// Whether it ends the saga completed (else cancelled).
    pub completes: bool,
}

/// What starts a [`Chain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The saga starts and every step succeeds.
    HappyPath,
    /// This step's work cannot be done.
    Fails(&'static str),
    /// Compensation is asked for from outside (the saga's cancel event).
    Cancelled,
}

/// What an event means to the saga, derived from the declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The saga started.
    Started,
    /// A step's work was done; `last` when it was the last step (the saga completed).
    Succeeded { step: &'static str, last: bool },
    /// A step's work could not be done; `first` when nothing before it needs undoing.
    Failed { step: &'static str, first: bool },
    /// A step was compensated; `first` when it was the first step (the saga is cancelled).
    Compensated { step: &'static str, first: bool },
    /// Compensation was asked for from outside the chain.
    CancelRequested,
    /// The platform reports a service stuck on an event.
    Stuck,
    /// Not an event of this choreography.
    Unknown,
}

/// The event types one service consumes: what its durable consumer filters and
/// what its handler may be given. Anything else is acknowledged unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub event_types: Vec<String>,
    /// Who may produce each type; a type not listed may come from anyone.
    pub producers: BTreeMap<String, Vec<String>>,
    /// The barrier row each type claims: the types that trigger the
    /// service's steps or ask for their compensation.
    pub claims: crate::barrier::Claims,
}

impl Subscription {
    /// These types, from any producer (a test's, or a saga without a declaration).
    pub fn of(event_types: &[&str]) -> Self {
        Subscription {
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
            producers: BTreeMap::new(),
            claims: BTreeMap::new(),
        }
    }

    /// Whether `envelope`, delivered on `subject`, is what it claims: its
    /// subject ends with its event type, and its producer is the one the
    /// declaration names. Says "forged or misrouted" and both sides otherwise.
    pub fn check_origin(
        &self,
        subject: &str,
        envelope: &crate::Envelope,
    ) -> Result<(), crate::Reject> {
        let event_type = &envelope.event_type;
        if !subject.ends_with(&format!(".{event_type}")) {
            return Err(crate::Reject::Forged(format!(
                "subject {subject:?} carries an event of type {event_type:?}"
            )));
        }
        if let Some(allowed) = self.producers.get(event_type.as_str())
            && !allowed.contains(&envelope.producer)
        {
            return Err(crate::Reject::Forged(format!(
                "{event_type} claims producer {:?}, but the choreography names {}",
                envelope.producer,
                allowed.join(" or ")
            )));
        }
        Ok(())
    }

    pub fn consumes(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == event_type)
    }

    /// The JetStream subjects of these events under `prefix`, sorted.
    pub fn subjects(&self, prefix: &str) -> Vec<String> {
        let mut subjects: Vec<String> = self
            .event_types
            .iter()
            .map(|t| format!("{prefix}.{t}"))
            .collect();
        subjects.sort();
        subjects
    }
}

/// Whether `a` and `b` are the same text, in a constant.
pub(crate) const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A rule of [`Choreography::check`] that the declaration breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject}: {rule}: {detail}")]
pub struct Violation {
    /// The step or event at fault.
    pub subject: String,
    /// The rule it breaks, in a few words.
    pub rule: &'static str,
    pub detail: String,
}

impl Choreography {
    /// The step named `name`. In a constant, a step's
    /// [`crate::step::CompensableStep::STEP`], a name the declaration does
    /// not hold fails the build.
    pub const fn step(&self, name: &str) -> &'static Step {
        let steps = self.steps;
        let mut i = 0;
        while i < steps.len() {
            if same(steps[i].name, name) {
                return &steps[i];
            }
            i += 1;
        }
        panic!("the choreography declares no step of that name")
    }

    pub fn event(&self, name: &str) -> Option<&'static Event> {
        self.events.iter().find(|e| e.name == name)
    }

    /// Every service named anywhere in the declaration, sorted.
    pub fn services(&self) -> Vec<&'static str> {
        let mut services = BTreeSet::new();
        for event in self.events {
            services.insert(event.producer);
            services.extend(event.consumers.iter().map(|(s, _)| *s));
        }
        services.into_iter().collect()
    }

    /// The events `service` consumes, in declaration order.
    pub fn subscription(&self, service: &str) -> Subscription {
        let mut types: Vec<&str> = self
            .events
            .iter()
            .filter(|e| e.consumers.iter().any(|(s, _)| *s == service))
            .map(|e| e.name)
            .collect();
        if self.stuck_reports_to.contains(&service) {
            types.push(STUCK);
        }
        let mut subscription = Subscription::of(&types);
        for event_type in &types {
            let producers = match self.event(event_type) {
                Some(event) => vec![event.producer.to_owned()],
                // The platform's own reports come from any service of the saga.
                None => self.services().into_iter().map(str::to_owned).collect(),
            };
            subscription
                .producers
                .insert((*event_type).to_owned(), producers);
        }
        for step in self.steps_of(service) {
            let claims = std::iter::once((step.trigger, Claim::Action(step.name))).chain(
                step.compensated_by
                    .iter()
                    .map(|event| (*event, Claim::Compensation(step.name))),
            );
            for (event_type, claim) in claims {
                subscription.claims.insert(event_type.to_owned(), claim);
            }
        }
        subscription
    }

    /// The steps `service` owns.
    pub fn steps_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'static Step> + 'a {
        self.steps.iter().filter(move |s| s.owner == service)
    }

    /// What `event_type` means to the saga.
    pub fn meaning(&self, event_type: &str) -> Meaning {
        let last = self.steps.len().saturating_sub(1);
        for (i, step) in self.steps.iter().enumerate() {
            if step.success == event_type {
                return Meaning::Succeeded {
                    step: step.name,
                    last: i == last,
                };
            }
            if step.failure == event_type {
                return Meaning::Failed {
                    step: step.name,
                    first: i == 0,
                };
            }
            if step.compensation == event_type {
                return Meaning::Compensated {
                    step: step.name,
                    first: i == 0,
                };
            }
        }
        match event_type {
            t if t == self.start => Meaning::Started,
            t if t == self.cancel => Meaning::CancelRequested,
            STUCK => Meaning::Stuck,
            _ => Meaning::Unknown,
        }
    }

    /// The happy path and every compensation chain, each as the events it
    /// runs through in order: the happy path from the start to the last
    /// step's success; a step's failure, or the cancel, through each earlier
    /// step's compensation down to the first step's.
    pub fn chains(&self) -> Vec<Chain> {
        let mut chains = vec![Chain {
            entry: Entry::HappyPath,
            events: std::iter::once(self.start)
                .chain(self.steps.iter().map(|s| s.success))
                .collect(),
            completes: true,
        }];
        let walk_back = |from: &'static str| {
            let mut events = vec![from];
            while let Some(undone) = self.steps.iter().find(|s| {
                s.compensated_by
                    .contains(events.last().expect("never empty"))
                    && !events.contains(&s.compensation)
            }) {
                events.push(undone.compensation);
            }
            events
        };
        for step in self.steps {
            chains.push(Chain {
                entry: Entry::Fails(step.name),
                events: walk_back(step.failure),
                completes: false,
            });
        }
        chains.push(Chain {
            entry: Entry::Cancelled,
            events: walk_back(self.cancel),
            completes: false,
        });
        chains
    }

    /// The static rules every choreography keeps; all broken ones, each naming
    /// the step or event at fault.
    pub fn check(&self) -> Result<(), Vec<Violation>> {
        let mut found = Vec::new();
        let mut broken = |subject: &str, rule: &'static str, detail: String| {
            found.push(Violation {
                subject: subject.to_owned(),
                rule,
                detail,
            })
        };

        // Every event has exactly one producer: declared once, by someone.
        let mut declared: HashMap<&str, usize> = HashMap::new();
        for event in self.events {
            *declared.entry(event.name).or_default() += 1;
            if event.producer.is_empty() {
                broken(
                    event.name,
                    "every event has exactly one producer",
                    "no producer".into(),
                );
            }
            if event.versions.is_empty() {
                broken(
                    event.name,
                    "every event has a schema version",
                    "no version declared".into(),
                );
            }
            if event.consumers.is_empty() {
                broken(
                    event.name,
                    "every event is consumed",
                    "nobody consumes it".into(),
                );
            }
        }
        for (name, count) in &declared {
            if *count > 1 {
                broken(
                    name,
                    "every event has exactly one producer",
                    format!("declared {count} times"),
                );
            }
        }

        // Every consumed or referenced event is produced, by the right service.
        let produced_by = |name: &str| self.event(name).map(|e| e.producer);
        let mut referenced = vec![
            ("the saga", "start", self.start),
            ("the saga", "cancel", self.cancel),
        ];
        for step in self.steps {
            referenced.push((step.name, "trigger", step.trigger));
            referenced.push((step.name, "success", step.success));
            referenced.push((step.name, "failure", step.failure));
            referenced.push((step.name, "compensation", step.compensation));
            for by in step.compensated_by {
                referenced.push((step.name, "compensated by", by));
            }
        }
        for (subject, what, name) in &referenced {
            if produced_by(name).is_none() {
                broken(
                    subject,
                    "every consumed event is produced by someone",
                    format!("its {what} event {name} is not declared, so nobody produces it"),
                );
            }
        }
        for step in self.steps {
            for (what, name) in [
                ("success", step.success),
                ("failure", step.failure),
                ("compensation", step.compensation),
            ] {
                if let Some(producer) = produced_by(name).filter(|p| *p != step.owner) {
                    broken(
                        step.name,
                        "a step writes its own outcomes",
                        format!(
                            "its {what} event {name} is produced by {producer}, not by {}",
                            step.owner
                        ),
                    );
                }
            }
            let consumes = |name: &str, role: Role| {
                self.event(name)
                    .is_some_and(|e| e.consumers.contains(&(step.owner, role)))
            };
            if !consumes(step.trigger, Role::Forward) {
                broken(
                    step.name,
                    "a step's owner consumes its trigger",
                    format!(
                        "{} does not consume {} as Forward",
                        step.owner, step.trigger
                    ),
                );
            }
            for by in step.compensated_by {
                if !consumes(by, Role::Failure) && !consumes(by, Role::Compensation) {
                    broken(
                        step.name,
                        "a step's owner consumes what compensates it",
                        format!(
                            "{} does not consume {by} as Failure or Compensation",
                            step.owner
                        ),
                    );
                }
            }
        }

        // Every step that does work has a compensation.
        for step in self.steps {
            if step.compensation.is_empty() || step.compensated_by.is_empty() {
                broken(
                    step.name,
                    "every step that does work has a compensation",
                    "no compensation event or nothing triggers it".into(),
                );
            }
        }

        // The forward chain: each step is triggered by the one before it.
        let mut expected_trigger = self.start;
        for step in self.steps {
            if step.trigger != expected_trigger {
                broken(
                    step.name,
                    "steps form one forward chain",
                    format!(
                        "triggered by {}, but the step before it ends with {expected_trigger}",
                        step.trigger
                    ),
                );
            }
            expected_trigger = step.success;
        }

        // Compensation runs in exactly the reverse order: a step is undone by
        // the failure or the compensation of the step after it; the last step
        // by the cancel.
        for (i, step) in self.steps.iter().enumerate() {
            let mut expected: Vec<&str> = match self.steps.get(i + 1) {
                Some(next) => vec![next.failure, next.compensation],
                None => vec![self.cancel],
            };
            let mut declared: Vec<&str> = step.compensated_by.to_vec();
            expected.sort();
            declared.sort();
            if declared != expected {
                broken(
                    step.name,
                    "compensation runs in reverse order of the forward chain",
                    format!(
                        "compensated by {declared:?}, but the reverse chain reaches it through {expected:?}"
                    ),
                );
            }
        }

        // Every chain ends at the one terminal event: the happy path at the
        // last step's success, every compensation at the first step's
        // compensation, and the first step's failure (nothing to undo) at itself.
        let ends = |name: &str| {
            self.event(name)
                .is_some_and(|e| e.consumers.iter().any(|(_, r)| *r == Role::Ends))
        };
        if let (Some(first), Some(last)) = (self.steps.first(), self.steps.last()) {
            for (subject, end) in [
                (last.name, last.success),
                (first.name, first.compensation),
                (first.name, first.failure),
            ] {
                if !ends(end) {
                    broken(
                        subject,
                        "every chain ends at the one terminal event",
                        format!("nobody consumes {end} as Ends"),
                    );
                }
            }
            for event in self.events {
                let terminal = [last.success, first.compensation, first.failure];
                if ends(event.name) && !terminal.contains(&event.name) {
                    broken(
                        event.name,
                        "every chain ends at the one terminal event",
                        format!(
                            "consumed as Ends, but the chains end at {} (completed) or {} (cancelled)",
                            last.success, first.compensation
                        ),
                    );
                }
            }
        } else {
            broken("the saga", "a saga has steps", "no step declared".into());
        }

        if found.is_empty() { Ok(()) } else { Err(found) }
    }

    /// The happy path and every compensation chain as a Mermaid flowchart.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        let node = |name: &str| name.replace('.', "_");
        let mut line = |text: String| {
            let _ = writeln!(out, "    {text}");
        };
        let owner_of = |name: &str| self.event(name).map(|e| e.producer).unwrap_or("?");
        line(format!(
            "{}([\"{} · {}\"])",
            node(self.start),
            owner_of(self.start),
            self.start
        ));
        for step in self.steps {
            line(format!(
                "{}[\"{} · {}\"]",
                node(step.success),
                step.owner,
                step.success
            ));
            line(format!(
                "{}{{{{\"{} · {}\"}}}}",
                node(step.failure),
                step.owner,
                step.failure
            ));
            line(format!(
                "{}[/\"{} · {}\"/]",
                node(step.compensation),
                step.owner,
                step.compensation
            ));
        }
        line(format!(
            "{}{{{{\"{} · {}\"}}}}",
            node(self.cancel),
            owner_of(self.cancel),
            self.cancel
        ));
        for step in self.steps {
            line(format!(
                "{} -->|{}| {}",
                node(step.trigger),
                step.name,
                node(step.success)
            ));
            line(format!(
                "{} -.->|{} fails| {}",
                node(step.trigger),
                step.name,
                node(step.failure)
            ));
            for by in step.compensated_by {
                line(format!(
                    "{} ==>|undo {}| {}",
                    node(by),
                    step.name,
                    node(step.compensation)
                ));
            }
        }
        if let (Some(first), Some(last)) = (self.steps.first(), self.steps.last()) {
            line("completed((COMPLETED))".into());
            line("cancelled((CANCELLED))".into());
            line(format!("{} --> completed", node(last.success)));
            line(format!("{} --> cancelled", node(first.compensation)));
            line(format!("{} --> cancelled", node(first.failure)));
        }
        out
    }
}

/// Marks the generated diagram in a Markdown document (the README).
pub const DIAGRAM_BEGIN: &str = "<!-- choreography diagram: generated, do not edit -->";
pub const DIAGRAM_END: &str = "<!-- end of choreography diagram -->";

/// `doc` with the Mermaid block between [`DIAGRAM_BEGIN`] and [`DIAGRAM_END`]
/// replaced by `mermaid`; `None` when the markers are missing.
pub fn with_diagram(doc: &str, mermaid: &str) -> Option<String> {
    let begin = doc.find(DIAGRAM_BEGIN)? + DIAGRAM_BEGIN.len();
    let end = begin + doc[begin..].find(DIAGRAM_END)?;
    Some(format!(
        "{}\n```mermaid\n{}```\n{}",
        &doc[..begin],
        mermaid,
        &doc[end..]
    ))
}

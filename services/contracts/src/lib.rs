//! Every wire contract of the order saga, generated from `proto/`: the event
//! payloads (with their event type and schema version) and the four services'
//! gRPC APIs. The only place a message shape is defined is `proto/`; this
//! crate adds the one table that binds each payload to its event type.
#![allow(clippy::large_enum_variant)]

use choreo::Decode;
use choreo::choreography::{self, Choreography, Role, Step};
use choreo::{Envelope, EventPayload, Reject};

pub mod events {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/events.v1.rs"));
    }
}
pub mod order {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/order.v1.rs"));
    }
}
pub mod inventory {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/inventory.v1.rs"));
    }
}
pub mod shipping {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/shipping.v1.rs"));
    }
}
pub mod notification {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/notification.v1.rs"));
    }
}

/// Encoded `FileDescriptorSet` of every API, for gRPC reflection.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// Declares the saga's events once: each payload's event type, schema
/// version, producer and consumers. From this one table come the payloads'
/// [`EventPayload`] impls, the typed [`SagaEvent`] with its decode table, and
/// the `events` of [`CHOREOGRAPHY`].
macro_rules! saga_events {
    ($($payload:ident = $event_type:literal, version $version:literal, by $producer:ident
        => $($consumer:ident: $role:ident),+;)*) => {
        $(
            impl EventPayload for events::v1::$payload {
                const EVENT_TYPE: &'static str = $event_type;
                const SCHEMA_VERSION: u32 = $version;
            }
        )*

        const EVENTS: &[choreography::Event] = &[
            $(choreography::Event {
                name: $event_type,
                producer: stringify!($producer),
                payload: concat!("events.v1.", stringify!($payload)),
                versions: &[$version],
                consumers: &[$((stringify!($consumer), Role::$role)),+],
            }),*
        ];

        /// Any event of the order saga, decoded once from its envelope.
        #[derive(Debug, Clone, PartialEq)]
        pub enum SagaEvent {
            $($payload(events::v1::$payload),)*
            /// Written by the platform library when a service keeps failing on an event.
            Stuck(choreo::proto::Stuck),
        }

        choreo::carries!(SagaEvent { $($payload(events::v1::$payload)),* });

        impl Decode for SagaEvent {
            /// The decode table: an unknown type or an unsupported version is a
            /// [`Reject`] (the message gets parked), and so is a payload that
            /// breaks its contract, before any effect.
            fn decode(envelope: &Envelope) -> Result<Self, Reject> {
                order_id_of(envelope)?;
                let event = match envelope.event_type.as_str() {
                    $($event_type => envelope.payload().map(SagaEvent::$payload),)*
                    choreography::STUCK => envelope.payload().map(SagaEvent::Stuck),
                    other => Err(Reject::UnknownType(other.to_owned())),
                }?;
                event.validate().map_err(|e| {
                    Reject::Invalid(format!("{} {e}", envelope.event_type))
                })?;
                Ok(event)
            }
        }
    };
}

// The order saga, on one screen. `Forward`: triggers the consumer's step;
// `Failure` / `Compensation`: makes the consumer undo its step; `Ends`: the
// order records the outcome; `Observe`: the order's timeline only (the order
// puts its own events on its timeline as it writes them).
saga_events! {
    OrderCreated          = "order.created",          version 1, by order        => inventory: Forward;
    InventoryReserved     = "inventory.reserved",     version 1, by inventory    => shipping: Forward, order: Observe;
    InventoryRejected     = "inventory.rejected",     version 1, by inventory    => order: Ends;
    ShippingScheduled     = "shipping.scheduled",     version 1, by shipping     => notification: Forward, order: Observe;
    ShippingFailed        = "shipping.failed",        version 1, by shipping     => inventory: Failure, order: Observe;
    NotificationSent      = "notification.sent",      version 1, by notification => order: Ends;
    NotificationFailed    = "notification.failed",    version 1, by notification => shipping: Failure, order: Observe;
    OrderCancelled        = "order.cancelled",        version 1, by order        => notification: Compensation;
    NotificationCancelled = "notification.cancelled", version 1, by notification => shipping: Compensation, order: Observe;
    ShippingCancelled     = "shipping.cancelled",     version 1, by shipping     => inventory: Compensation, order: Observe;
    InventoryReleased     = "inventory.released",     version 1, by inventory    => order: Ends;
}

/// The order saga: three compensable steps after the order is placed.
pub const CHOREOGRAPHY: Choreography = Choreography {
    start: "order.created",
    cancel: "order.cancelled",
    events: EVENTS,
    steps: &[
        Step {
            name: "reserve",
            owner: "inventory",
            trigger: "order.created",
            success: "inventory.reserved",
            failure: "inventory.rejected",
            compensated_by: &["shipping.failed", "shipping.cancelled"],
            compensation: "inventory.released",
        },
        Step {
            name: "ship",
            owner: "shipping",
            trigger: "inventory.reserved",
            success: "shipping.scheduled",
            failure: "shipping.failed",
            compensated_by: &["notification.failed", "notification.cancelled"],
            compensation: "shipping.cancelled",
        },
        Step {
            name: "notify",
            owner: "notification",
            trigger: "shipping.scheduled",
            success: "notification.sent",
            failure: "notification.failed",
            compensated_by: &["order.cancelled"],
            compensation: "notification.cancelled",
        },
    ],
    stuck_reports_to: &["order"],
};

/// At most this many lines in one order.
pub const MAX_LINES: usize = 50;
/// At most this many units of one SKU in one order.
pub const MAX_QUANTITY: u32 = 10_000;

/// The one check of an order's lines every consumer applies: 1 to
/// [`MAX_LINES`] lines, each a valid SKU once, 1 to [`MAX_QUANTITY`] units.
pub fn check_lines(lines: &[events::v1::OrderLine]) -> Result<(), String> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(format!("has {} lines: 1 to {MAX_LINES}", lines.len()));
    }
    for (n, line) in lines.iter().enumerate() {
        check_sku(&line.sku).map_err(|e| format!("line {}: {e}", n + 1))?;
        if line.quantity == 0 || line.quantity > MAX_QUANTITY {
            return Err(format!(
                "line {}: quantity {} is out of range 1 to {MAX_QUANTITY}",
                n + 1,
                line.quantity
            ));
        }
        if lines[..n].iter().any(|l| l.sku == line.sku) {
            return Err(format!("line {}: SKU {} appears twice", n + 1, line.sku));
        }
    }
    Ok(())
}

impl SagaEvent {
    /// The payload's own invariants, checked on consume before any effect.
    pub fn validate(&self) -> Result<(), String> {
        use SagaEvent::*;
        match self {
            OrderCreated(e) => check_lines(&e.lines),
            InventoryReserved(e) => check_lines(&e.lines),
            InventoryReleased(e) if !e.released.is_empty() => check_lines(&e.released),
            _ => Ok(()),
        }
    }
}

impl choreo::step::Cause for SagaEvent {
    /// Why the order is being compensated, as this event tells it: a failure
    /// names its producer (read from the envelope) and its reason; a
    /// compensation or a cancel carries the cause down the chain.
    fn cause(&self, envelope: &Envelope) -> Option<String> {
        use SagaEvent::*;
        let failure = |reason: &str| format!("{}: {reason}", envelope.producer);
        let cause = match self {
            InventoryRejected(e) => failure(&e.reason),
            ShippingFailed(e) => failure(&e.reason),
            NotificationFailed(e) => failure(&e.reason),
            OrderCancelled(e) => e.reason.clone(),
            NotificationCancelled(e) => e.cause.clone(),
            ShippingCancelled(e) => e.cause.clone(),
            InventoryReleased(e) => e.cause.clone(),
            _ => return None,
        };
        Some(cause).filter(|c| !c.is_empty())
    }
}

/// The order an event belongs to: its saga id, which must be an order id (a
/// UUID); anything else is a malformed event, parked.
pub fn order_id_of(envelope: &Envelope) -> Result<uuid::Uuid, Reject> {
    uuid::Uuid::parse_str(&envelope.saga_id).map_err(|_| {
        Reject::Malformed(format!("saga id {:?} is not an order id", envelope.saga_id))
    })
}

/// The one check of an order id every API applies: required, and a UUID
/// (returned in the canonical form the services store).
pub fn parse_order_id(text: &str) -> Result<uuid::Uuid, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("order_id is required".into());
    }
    uuid::Uuid::parse_str(text).map_err(|_| format!("order_id {} is not a UUID", quote(text)))
}

/// A client's bad value as an error message shows it: at most a short prefix,
/// so a huge value never comes back huge: at most 40 characters, and fewer
/// where their escaped form would pass 120 bytes (a character can escape
/// to ten, `\u{10ffff}`).
pub fn quote(value: &str) -> String {
    const SHOWN: usize = 40;
    const SHOWN_BYTES: usize = 120;
    let mut cut = value
        .char_indices()
        .nth(SHOWN)
        .map_or(value.len(), |(i, _)| i);
    let mut shown = format!("{:?}", &value[..cut]);
    while shown.len() > SHOWN_BYTES {
        cut = value[..cut].char_indices().last().map_or(0, |(i, _)| i);
        shown = format!("{:?}", &value[..cut]);
    }
    if cut == value.len() {
        shown
    } else {
        format!("{shown}… ({} bytes)", value.len())
    }
}

/// The one check of free text a person typed (a name, a contact, a reason):
/// no NUL or other control characters, which the database refuses or a log
/// would show as something else.
pub fn check_text(field: &str, value: &str) -> Result<(), String> {
    match value.chars().position(char::is_control) {
        None => Ok(()),
        Some(at) => Err(format!(
            "{field} has a control character at position {}: only printable text is accepted",
            at + 1
        )),
    }
}

/// The one SKU format every service accepts: 1 to 64 letters, digits, '-' or '_'.
pub fn check_sku(sku: &str) -> Result<(), String> {
    if sku.is_empty() {
        return Err("sku is required".into());
    }
    if sku.len() > 64
        || !sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "sku {} must be 1 to 64 letters, digits, '-' or '_'",
            quote(sku)
        ));
    }
    Ok(())
}

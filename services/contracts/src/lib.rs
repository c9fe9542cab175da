//! Every wire contract of the order saga, generated from `proto/`: the event
//! payloads (with their event type and schema version) and the four services'
//! gRPC APIs. The only place a message shape is defined is `proto/`; this
//! crate adds the one table that binds each payload to its event type.
#![allow(clippy::large_enum_variant)]

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

/// Binds each payload of `events/v1` to its event type and schema version.
macro_rules! event_payloads {
    ($($payload:ident = $event_type:literal, version $version:literal);* $(;)?) => {
        $(
            impl EventPayload for events::v1::$payload {
                const EVENT_TYPE: &'static str = $event_type;
                const SCHEMA_VERSION: u32 = $version;
            }
        )*
    };
}

event_payloads! {
    OrderCreated = "order.created", version 1;
    OrderCancelled = "order.cancelled", version 1;
    InventoryReserved = "inventory.reserved", version 1;
    InventoryRejected = "inventory.rejected", version 1;
    InventoryReleased = "inventory.released", version 1;
    ShippingScheduled = "shipping.scheduled", version 1;
    ShippingFailed = "shipping.failed", version 1;
    ShippingCancelled = "shipping.cancelled", version 1;
    NotificationSent = "notification.sent", version 1;
    NotificationFailed = "notification.failed", version 1;
    NotificationCancelled = "notification.cancelled", version 1;
}

macro_rules! saga_events {
    ($($variant:ident($payload:path)),* $(,)?) => {
        /// Any event of the order saga, decoded from its envelope.
        #[derive(Debug, Clone, PartialEq)]
        pub enum SagaEvent {
            $($variant($payload)),*
        }

        impl SagaEvent {
            /// Decodes the payload an envelope carries; an unknown type or an
            /// unsupported version is a [`Reject`] (the message gets parked).
            pub fn decode(envelope: &Envelope) -> Result<Self, Reject> {
                $(
                    if envelope.event_type == <$payload as EventPayload>::EVENT_TYPE {
                        return envelope.payload().map(SagaEvent::$variant);
                    }
                )*
                Err(Reject::UnknownType(envelope.event_type.clone()))
            }
        }
    };
}

saga_events! {
    OrderCreated(events::v1::OrderCreated),
    OrderCancelled(events::v1::OrderCancelled),
    InventoryReserved(events::v1::InventoryReserved),
    InventoryRejected(events::v1::InventoryRejected),
    InventoryReleased(events::v1::InventoryReleased),
    ShippingScheduled(events::v1::ShippingScheduled),
    ShippingFailed(events::v1::ShippingFailed),
    ShippingCancelled(events::v1::ShippingCancelled),
    NotificationSent(events::v1::NotificationSent),
    NotificationFailed(events::v1::NotificationFailed),
    NotificationCancelled(events::v1::NotificationCancelled),
    // Written by the platform library when a service keeps failing on an event.
    Stuck(choreo::proto::Stuck),
}

/// The one check of an order id every API applies: required, and a UUID
/// (returned in the canonical form the services store).
pub fn parse_order_id(text: &str) -> Result<uuid::Uuid, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("order_id is required".into());
    }
    uuid::Uuid::parse_str(text).map_err(|_| format!("order_id {text:?} is not a UUID"))
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
            "sku {sku:?} must be 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// The cause of a compensation as the order shows it: the step that failed
/// (or "customer", "deadline") and its reason. Built in one place so every
/// service that starts or passes on a compensation words it the same way.
pub fn cause(step: &str, reason: &str) -> String {
    format!("{step}: {reason}")
}

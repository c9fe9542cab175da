//! The versioned envelope every event travels in, and the trait that ties a
//! payload message to its event type and schema version.
use prost::Message;
use uuid::Uuid;

pub use crate::proto::Envelope;

/// A payload message that can travel as an event.
pub trait EventPayload: Message + Default + Sized {
    /// Dotted event name, e.g. `order.created`; also the subject suffix.
    const EVENT_TYPE: &'static str;
    /// The schema version this code writes and reads.
    const SCHEMA_VERSION: u32;
}

impl EventPayload for crate::proto::Stuck {
    const EVENT_TYPE: &'static str = "choreo.stuck";
    const SCHEMA_VERSION: u32 = 1;
}

/// Why a message was parked in the dead-letter table instead of handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The subject, type and producer disagree with the declared choreography.
    #[error("forged or misrouted: {0}")]
    Forged(String),
    /// The payload breaks its contract (a value out of range, a duplicate line),
    /// or the database refuses its effects for good (a constraint): retrying
    /// can never succeed.
    #[error("contract violated: {0}")]
    Invalid(String),
    /// The handler was given an event its service does not consume: the
    /// choreography declaration and the handler disagree.
    #[error("event type {0:?} reached a handler that does not handle it")]
    NotConsumed(String),
    #[error(
        "unsupported schema version {version} of {event_type:?} (this consumer reads {supported})"
    )]
    UnsupportedVersion {
        event_type: String,
        version: u32,
        supported: u32,
    },
}

impl Envelope {
    /// A new event for `saga_id`, caused by `cause` (whose trace context it inherits).
    pub fn new<P: EventPayload>(
        producer: &str,
        saga_id: &str,
        cause: Option<&Envelope>,
        payload: &P,
    ) -> Self {
        let now = std::time::SystemTime::now();
        Envelope {
            event_id: Uuid::now_v7().to_string(),
            event_type: P::EVENT_TYPE.to_owned(),
            schema_version: P::SCHEMA_VERSION,
            saga_id: saga_id.to_owned(),
            causation_id: cause.map(|c| c.event_id.clone()).unwrap_or_default(),
            producer: producer.to_owned(),
            occurred_at: Some(now.into()),
            traceparent: cause.map(|c| c.traceparent.clone()).unwrap_or_default(),
            payload: payload.encode_to_vec(),
        }
    }

    /// Decodes an envelope from the wire and checks the fields every consumer relies on.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Reject> {
        let env = Envelope::decode(bytes)
            .map_err(|e| Reject::Malformed(format!("not an event envelope: {e}")))?;
        if Uuid::parse_str(&env.event_id).is_err() {
            return Err(Reject::Malformed(format!(
                "event_id {:?} is not a UUID",
                env.event_id
            )));
        }
        if env.event_type.is_empty() {
            return Err(Reject::Malformed("event_type is empty".into()));
        }
        if env.saga_id.is_empty() {
            return Err(Reject::Malformed("saga_id is empty".into()));
        }
        // Clocks drift a little; an event from the future beyond that is forged.
        let skew = chrono::Duration::minutes(5);
        match env.occurred_at {
            None => return Err(Reject::Malformed("occurred_at is missing".into())),
            Some(_) if env.occurred_at() > chrono::Utc::now() + skew => {
                return Err(Reject::Invalid(format!(
                    "occurred_at {} is in the future",
                    env.occurred_at()
                )));
            }
            Some(_) => {}
        }
        Ok(env)
    }

    /// The event id as a UUID (checked by [`Envelope::from_bytes`]).
    pub fn id(&self) -> Uuid {
        Uuid::parse_str(&self.event_id).unwrap_or_default()
    }

    /// Decodes the payload as `P`, checking that type and version match.
    pub fn payload<P: EventPayload>(&self) -> Result<P, Reject> {
        if self.event_type != P::EVENT_TYPE {
            return Err(Reject::UnknownType(self.event_type.clone()));
        }
        if self.schema_version != P::SCHEMA_VERSION {
            return Err(Reject::UnsupportedVersion {
                event_type: self.event_type.clone(),
                version: self.schema_version,
                supported: P::SCHEMA_VERSION,
            });
        }
        P::decode(self.payload.as_slice()).map_err(|e| {
            Reject::Malformed(format!("payload of {} is unreadable: {e}", self.event_type))
        })
    }

    /// When the producer wrote the event, as a chrono time.
    pub fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.occurred_at
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or_default()
    }
}

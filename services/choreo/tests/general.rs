//! The platform is not the order saga's: a two-step choreography of its own
//! (a trip: hold a hotel, then a car), declared here, checked, and run by two
//! small services on the real runtime against real NATS and PostgreSQL. It
//! shows the forward path and one compensation chain in reverse.
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use choreo::choreography::{Choreography, Event, Role, Step};
use choreo::runtime::{Context, Parts, Ports, Service};
use choreo::step::{self, CompensableStep, Undo, Verdict};
use choreo::{Config, Decode, Envelope, EventPayload, HandleError, Handler, Outbox, Reject, Tx};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

/// A payload type per event, each a prost message with one field.
macro_rules! payloads {
    ($($name:ident = $event_type:literal { $field:ident: $ty:ty, $kind:ident });* $(;)?) => {
        $(
            #[derive(Clone, PartialEq, prost::Message)]
            struct $name {
                #[prost($kind, tag = "1")]
                $field: $ty,
            }
            impl EventPayload for $name {
                const EVENT_TYPE: &'static str = $event_type;
                const SCHEMA_VERSION: u32 = 1;
            }
        )*

        #[derive(Debug, Clone)]
        #[allow(dead_code)] // each service reads only the variants it consumes
        enum TripEvent { $($name($name)),* }

        choreo::carries!(TripEvent { $($name($name)),* });

        impl Decode for TripEvent {
            fn decode(envelope: &Envelope) -> Result<Self, Reject> {
                match envelope.event_type.as_str() {
                    $($event_type => envelope.payload().map(TripEvent::$name),)*
                    other => Err(Reject::UnknownType(other.to_owned())),
                }
            }
        }
    };
}

payloads! {
    TripBooked = "trip.booked" { destination: String, string };
    TripCancelled = "trip.cancelled" { reason: String, string };
    HotelHeld = "hotel.held" { destination: String, string };
    HotelRefused = "hotel.refused" { reason: String, string };
    HotelReleased = "hotel.released" { cause: String, string };
    CarHeld = "car.held" { destination: String, string };
    CarRefused = "car.refused" { reason: String, string };
    CarReleased = "car.released" { cause: String, string };
}

const fn event(
    name: &'static str,
    producer: &'static str,
    consumers: &'static [(&'static str, Role)],
) -> Event {
    Event {
        name,
        producer,
        payload: name,
        versions: &[1],
        consumers,
    }
}

/// Why a trip is being compensated, as its events tell it.
impl step::Cause for TripEvent {
    fn cause(&self, envelope: &Envelope) -> Option<String> {
        match self {
            TripEvent::CarRefused(CarRefused { reason }) => {
                Some(format!("{}: {reason}", envelope.producer))
            }
            TripEvent::CarReleased(CarReleased { cause }) => Some(cause.clone()),
            TripEvent::TripCancelled(TripCancelled { reason }) => Some(reason.clone()),
            _ => None,
        }
    }
}

const TRIP: Choreography = Choreography {
    start: "trip.booked",
    cancel: "trip.cancelled",
    events: &[
        event("trip.booked", "desk", &[("hotels", Role::Forward)]),
        event("trip.cancelled", "desk", &[("cars", Role::Compensation)]),
        event("hotel.held", "hotels", &[("cars", Role::Forward)]),
        event("hotel.refused", "hotels", &[("desk", Role::Ends)]),
        event("hotel.released", "hotels", &[("desk", Role::Ends)]),
        event("car.held", "cars", &[("desk", Role::Ends)]),
        event("car.refused", "cars", &[("hotels", Role::Failure)]),
        event("car.released", "cars", &[("hotels", Role::Compensation)]),
    ],
    steps: &[
        Step {
            name: "hotel",
            owner: "hotels",
            trigger: "trip.booked",
            success: "hotel.held",
            failure: "hotel.refused",
            compensated_by: &["car.refused", "car.released"],
            compensation: "hotel.released",
        },
        Step {
            name: "car",
            owner: "cars",
            trigger: "hotel.held",
            success: "car.held",
            failure: "car.refused",
            compensated_by: &["trip.cancelled"],
            compensation: "car.released",
        },
    ],
    stuck_reports_to: &[],
};

/// Holds a hotel anywhere.
struct Hotels {
    outbox: Outbox,
}

#[async_trait::async_trait]
impl CompensableStep for Hotels {
    const STEP: &'static Step = TRIP.step("hotel");
    type Event = TripEvent;
    type Input = TripBooked;
    type Success = HotelHeld;
    type Failure = HotelRefused;
    type Compensated = HotelReleased;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn work(
        &self,
        _tx: &mut Tx<'_>,
        _envelope: &Envelope,
        trip: TripBooked,
    ) -> Result<Verdict<HotelHeld, HotelRefused>, HandleError> {
        Ok(Verdict::Succeeded(HotelHeld {
            destination: trip.destination,
        }))
    }

    async fn undo(
        &self,
        _tx: &mut Tx<'_>,
        _envelope: &Envelope,
        _undo: Undo,
        cause: String,
    ) -> Result<HotelReleased, HandleError> {
        Ok(HotelReleased { cause })
    }
}

/// Holds a car, except on islands.
struct Cars {
    outbox: Outbox,
}

#[async_trait::async_trait]
impl CompensableStep for Cars {
    const STEP: &'static Step = TRIP.step("car");
    type Event = TripEvent;
    type Input = HotelHeld;
    type Success = CarHeld;
    type Failure = CarRefused;
    type Compensated = CarReleased;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn work(
        &self,
        _tx: &mut Tx<'_>,
        _envelope: &Envelope,
        hotel: HotelHeld,
    ) -> Result<Verdict<CarHeld, CarRefused>, HandleError> {
        Ok(if hotel.destination == "island" {
            Verdict::Failed(CarRefused {
                reason: "no cars on islands".into(),
            })
        } else {
            Verdict::Succeeded(CarHeld {
                destination: hotel.destination,
            })
        })
    }

    async fn undo(
        &self,
        _tx: &mut Tx<'_>,
        _envelope: &Envelope,
        _undo: Undo,
        cause: String,
    ) -> Result<CarReleased, HandleError> {
        Ok(CarReleased { cause })
    }
}

fn no_routes() -> tonic::service::Routes {
    tonic::service::Routes::default()
}

/// Starts service `name` of [`TRIP`] on the real runtime until `shutdown`.
async fn start<H: Handler>(
    name: &'static str,
    config: Config,
    shutdown: CancellationToken,
    build: fn(Outbox) -> H,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let service = Service::new(
        name,
        &TRIP,
        Ports {
            grpc: 0,
            metrics: 0,
        },
        config,
        sqlx::migrate::Migrator::with_migrations(vec![]),
    );
    tokio::spawn(service.run_until(
        move |context: &Context| Parts {
            handler: Arc::new(build(context.outbox.clone())),
            routes: no_routes(),
            service_names: vec![],
            descriptor: choreo::DESCRIPTOR_SET,
            admin_methods: vec![],
            erasures: vec![],
        },
        shutdown,
    ))
}

/// The configuration of a trip service of run `run`, on database `db`: it
/// provisions the run's own stream and sweeps its outbox every 100 ms.
fn trip_config(nats_url: &str, db: &str, run: &str) -> Config {
    let mut config = Config::new(nats_url, db);
    config.provision_jetstream = true;
    config.stream = format!("TRIP_{run}");
    config.subject_prefix = format!("trip_{run}");
    config.relay_poll_ms = 100;
    config
}

/// The desk books `trips` (saga, destination), as the saga's owner would,
/// once run `run`'s stream of the desk's events exists (a service
/// provisions it).
async fn book(js: &async_nats::jetstream::Context, run: &str, trips: &[(&str, &str)]) {
    for _ in 0..100 {
        if js.get_stream(format!("TRIP_{run}_DESK")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (saga, destination) in trips {
        let trip = Envelope::new(
            "desk",
            saga,
            None,
            &TripBooked {
                destination: (*destination).into(),
            },
        );
        js.send_publish(
            format!("trip_{run}.trip.booked"),
            PublishMessage::build()
                .payload(trip.encode_to_vec().into())
                .message_id(trip.event_id.clone()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

#[test]
fn the_trip_choreography_keeps_every_rule() {
    TRIP.check().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_choreography_of_its_own_runs_forward_and_compensates_in_reverse() {
    let infra = tokio::task::spawn_blocking(harness::Infra::start)
        .await
        .unwrap()
        .unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let config = |db: String| trip_config(infra.nats.url(), &db, &run);
    let shutdown = CancellationToken::new();
    let hotels = start(
        "hotels",
        config(infra.postgres.fresh_database().await.unwrap()),
        shutdown.clone(),
        |outbox| Hotels { outbox },
    )
    .await;
    let cars = start(
        "cars",
        config(infra.postgres.fresh_database().await.unwrap()),
        shutdown.clone(),
        |outbox| Cars { outbox },
    )
    .await;

    // The desk books two trips, as the saga's owner would, and watches the stream.
    let client = choreo::runtime::connect_once(infra.nats.url(), "test", None)
        .await
        .unwrap();
    let mut watch = client.subscribe(format!("trip_{run}.>")).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    book(
        &js,
        &run,
        &[("city-trip", "city"), ("island-trip", "island")],
    )
    .await;

    let mut seen: Vec<(String, String, String)> = Vec::new();
    let ends = |seen: &Vec<(String, String, String)>| {
        seen.iter()
            .any(|(s, t, _)| s == "city-trip" && t == "car.held")
            && seen
                .iter()
                .any(|(s, t, _)| s == "island-trip" && t == "hotel.released")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ends(&seen) {
        let message = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("both trips end within 30 s")
            .unwrap();
        let envelope = Envelope::from_bytes(&message.payload).unwrap();
        seen.push((envelope.saga_id, envelope.event_type, envelope.producer));
    }
    let of = |saga: &str| -> Vec<String> {
        seen.iter()
            .filter(|(s, _, _)| s == saga)
            .map(|(_, t, p)| format!("{p}:{t}"))
            .collect()
    };
    assert_eq!(
        of("city-trip"),
        ["desk:trip.booked", "hotels:hotel.held", "cars:car.held"]
    );
    assert_eq!(
        of("island-trip"),
        [
            "desk:trip.booked",
            "hotels:hotel.held",
            "cars:car.refused",
            "hotels:hotel.released"
        ]
    );
    // The compensation carried the cause, named after the producer from the envelope.
    let released = {
        let stream = js.get_stream(format!("TRIP_{run}_HOTELS")).await.unwrap();
        let last = stream
            .get_last_raw_message_by_subject(&format!("trip_{run}.hotel.released"))
            .await
            .unwrap();
        Envelope::from_bytes(&last.payload).unwrap()
    };
    let released: HotelReleased = released.payload().unwrap();
    assert_eq!(released.cause, "cars: no cars on islands");

    shutdown.cancel();
    hotels.await.unwrap().unwrap();
    cars.await.unwrap().unwrap();
}

/// Every try at holding a hotel "nowhere", counted.
static TRIES_FOR_NOWHERE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Holds a hotel anywhere but "nowhere", where its database call always fails.
struct FailingHotels {
    hotels: Hotels,
}

#[async_trait::async_trait]
impl Handler for FailingHotels {
    type Event = TripEvent;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: TripEvent,
    ) -> Result<(), HandleError> {
        if let TripEvent::TripBooked(trip) = &event
            && trip.destination == "nowhere"
        {
            TRIES_FOR_NOWHERE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(HandleError::Transient("the hotel desk is down".into()));
        }
        self.hotels.handle(tx, envelope, event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_keeps_failing_retries_in_its_lane_only_on_its_first_delivery() {
    let infra = tokio::task::spawn_blocking(harness::Infra::start)
        .await
        .unwrap()
        .unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let config = trip_config(
        infra.nats.url(),
        &infra.postgres.fresh_database().await.unwrap(),
        &run,
    );
    // One lane (the default): the failing trip and the good one share it.
    assert_eq!(config.consumer_batch_lanes, 1);
    let shutdown = CancellationToken::new();
    let hotels = start("hotels", config, shutdown.clone(), |outbox| FailingHotels {
        hotels: Hotels { outbox },
    })
    .await;

    let client = choreo::runtime::connect_once(infra.nats.url(), "test", None)
        .await
        .unwrap();
    let mut held = client
        .subscribe(format!("trip_{run}.hotel.held"))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    book(
        &js,
        &run,
        &[("lost-trip", "nowhere"), ("city-trip", "city")],
    )
    .await;

    // The good trip goes through while the other keeps failing in the same lane.
    let message = tokio::time::timeout(Duration::from_secs(30), held.next())
        .await
        .expect("the city trip's hotel is held")
        .unwrap();
    assert_eq!(
        Envelope::from_bytes(&message.payload).unwrap().saga_id,
        "city-trip"
    );

    // Deliveries of the failing trip: all the deliveries of the consumer of
    // the desk's events but the city trip's one.
    let stream = js.get_stream(format!("TRIP_{run}_DESK")).await.unwrap();
    let deliveries = loop {
        let info = stream.consumer_info("hotels").await.unwrap();
        let deliveries = info.delivered.consumer_sequence - 1;
        if deliveries >= 4 {
            break deliveries;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let tries = TRIES_FOR_NOWHERE.load(std::sync::atomic::Ordering::SeqCst);
    // Five tries on the first delivery (and one more if it first went in a
    // batch with the city trip's), one on each later one; the last
    // delivery's try may not have run yet, or a next delivery's may have.
    let expected = 5 + (deliveries - 1);
    assert!(
        (expected - 1..=expected + 2).contains(&tries),
        "{tries} tries over {deliveries} deliveries; expected about {expected} (five each would be {})",
        5 * deliveries
    );

    shutdown.cancel();
    hotels.await.unwrap().unwrap();
}

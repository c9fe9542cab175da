//! The compensation barrier against a real PostgreSQL: late actions refused,
//! early compensations recorded, races resolved consistently.
mod common;

use choreo::Effect;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_orders_actions_and_compensations() {
    let s = setup().await;
    let mut tx = s.pool.begin().await.unwrap();
    // Compensation before action: recorded, nothing to undo, action refused for good.
    assert_eq!(
        barrier::compensation(&mut tx, "a", "reserve")
            .await
            .unwrap(),
        Compensation::NothingToUndo
    );
    assert_eq!(
        barrier::compensation(&mut tx, "a", "reserve")
            .await
            .unwrap(),
        Compensation::AlreadyCompensated
    );
    assert_eq!(
        barrier::action(&mut tx, "a", "reserve").await.unwrap(),
        Action::Refused
    );
    assert_eq!(
        barrier::action(&mut tx, "a", "reserve").await.unwrap(),
        Action::Refused
    );
    // Action, repeat, compensation, repeat, late action.
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::Proceed
    );
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::AlreadyDone
    );
    assert_eq!(
        barrier::compensation(&mut tx, "b", "reserve")
            .await
            .unwrap(),
        Compensation::Undo
    );
    assert_eq!(
        barrier::compensation(&mut tx, "b", "reserve")
            .await
            .unwrap(),
        Compensation::AlreadyCompensated
    );
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::Refused
    );
    // Steps are independent.
    assert_eq!(
        barrier::action(&mut tx, "b", "ship").await.unwrap(),
        Action::Proceed
    );
    tx.commit().await.unwrap();

    // Racing action and compensation in two transactions: exactly one consistent story.
    for round in 0..20 {
        let saga = format!("race-{round}");
        let (pa, pc) = (s.pool.clone(), s.pool.clone());
        let (sa, sc) = (saga.clone(), saga.clone());
        let act = tokio::spawn(async move {
            let mut tx = pa.begin().await.unwrap();
            let r = barrier::action(&mut tx, &sa, "step").await.unwrap();
            tx.commit().await.unwrap();
            r
        });
        let comp = tokio::spawn(async move {
            let mut tx = pc.begin().await.unwrap();
            let r = barrier::compensation(&mut tx, &sc, "step").await.unwrap();
            tx.commit().await.unwrap();
            r
        });
        let (a, c) = (act.await.unwrap(), comp.await.unwrap());
        assert!(
            matches!(
                (a, c),
                (Action::Proceed, Compensation::Undo)
                    | (Action::Refused, Compensation::NothingToUndo)
            ),
            "inconsistent race outcome {a:?} / {c:?}"
        );
    }
}

/// A step's trigger: `skip` makes the handler leave the step alone.
#[derive(Clone, PartialEq, prost::Message)]
struct Go {
    #[prost(bool, tag = "1")]
    skip: bool,
}
impl EventPayload for Go {
    const EVENT_TYPE: &'static str = "test.go";
    const SCHEMA_VERSION: u32 = 1;
}

/// Asks for the step's compensation.
#[derive(Clone, PartialEq, prost::Message)]
struct Back {}
impl EventPayload for Back {
    const EVENT_TYPE: &'static str = "test.back";
    const SCHEMA_VERSION: u32 = 1;
}

#[derive(Debug, Clone)]
enum GoOrBack {
    Go(Go),
    Back(Back),
}
choreo::carries!(GoOrBack { Go(Go), Back(Back) });

impl choreo::step::Cause for GoOrBack {
    fn cause(&self, _envelope: &Envelope) -> Option<String> {
        matches!(self, GoOrBack::Back(_)).then(|| "back".into())
    }
}

impl Decode for GoOrBack {
    fn decode(envelope: &Envelope) -> Result<Self, Reject> {
        match envelope.event_type.as_str() {
            Go::EVENT_TYPE => envelope.payload().map(GoOrBack::Go),
            Back::EVENT_TYPE => envelope.payload().map(GoOrBack::Back),
            other => Err(Reject::UnknownType(other.to_owned())),
        }
    }
}

/// A compensable step that writes down what it did: `log (saga, what)`.
/// With `alone`, its work is also one statement, which the consumer
/// applies with the trigger's inbox insert and barrier claim when the
/// trigger comes alone.
struct Logged {
    outbox: Outbox,
    alone: bool,
}

#[async_trait::async_trait]
impl choreo::step::CompensableStep for Logged {
    type Event = GoOrBack;
    const STEP: &'static choreo::choreography::Step = &choreo::choreography::Step {
        name: "logged",
        owner: "test",
        trigger: Go::EVENT_TYPE,
        success: Ping::EVENT_TYPE,
        failure: Ping::EVENT_TYPE,
        compensated_by: &[Back::EVENT_TYPE],
        compensation: Ping::EVENT_TYPE,
    };
    type Input = Go;
    type Success = Ping;
    type Failure = Ping;
    type Compensated = Ping;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn work(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        _go: Go,
    ) -> Result<choreo::step::Verdict<Ping, Ping>, HandleError> {
        log(tx, &envelope.saga_id, "work").await?;
        Ok(choreo::step::Verdict::Succeeded(Ping { n: 1 }))
    }

    /// The same work, and a mark in `alone` that tells it went this way.
    fn work_as_statement(
        &self,
        envelope: &Envelope,
        _go: &Go,
    ) -> Option<choreo::step::WorkStatement<Ping, Ping>> {
        let statement = Effect::new(
            "logged AS (INSERT INTO log (saga, what) VALUES ($1, 'work') RETURNING at),
             marked AS (INSERT INTO alone (saga) VALUES ($1))",
            "SELECT at FROM logged",
        )
        .bind(envelope.saga_id.clone());
        self.alone
            .then_some((statement, choreo::step::Verdict::Succeeded(Ping { n: 1 })))
    }

    async fn undo(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        undo: choreo::step::Undo,
        _cause: String,
    ) -> Result<Ping, HandleError> {
        log(tx, &envelope.saga_id, &format!("{undo:?}")).await?;
        Ok(Ping { n: 2 })
    }
}

async fn log(tx: &mut Tx<'_>, saga: &str, what: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO log (saga, what) VALUES ($1, $2)")
        .bind(saga)
        .bind(what)
        .execute(&mut **tx)
        .await
        .map(drop)
}

/// [`Logged`] as a handler whose trigger can leave the step alone
/// (`skip`); otherwise as the step alone would be.
struct SkipsOrLogs(Logged);

#[async_trait::async_trait]
impl Handler for SkipsOrLogs {
    type Event = GoOrBack;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: GoOrBack,
    ) -> Result<(), HandleError> {
        match event {
            GoOrBack::Go(Go { skip: true }) => Ok(()),
            GoOrBack::Go(go) => choreo::step::act(&self.0, tx, envelope, go).await,
            GoOrBack::Back(_) => {
                choreo::step::compensate(&self.0, tx, envelope, "back".into()).await
            }
        }
    }

    fn effect_alone(&self, envelope: &Envelope, event: &GoOrBack) -> Option<Effect> {
        match event {
            GoOrBack::Go(go) if !go.skip => choreo::step::act_alone(&self.0, envelope, go),
            _ => None,
        }
    }
}

/// The inbox step claims a step's barrier row in its own statement when the
/// declaration ties the event's type to the step. Every rule of the barrier
/// must come out as it does when the step asks the barrier itself: the same
/// story for each saga with the claims and without them, alone and in a batch,
/// and when a trigger that comes alone is applied as one statement with its
/// work, its outcome event, its inbox insert and its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_made_with_the_inbox_keep_every_barrier_rule() {
    let declared = barrier::Claims::from([
        (Go::EVENT_TYPE.to_owned(), barrier::Claim::Action("logged")),
        (
            Back::EVENT_TYPE.to_owned(),
            barrier::Claim::Compensation("logged"),
        ),
    ]);
    let mut stories = Vec::new();
    for (claims, as_statement) in [
        (declared.clone(), false),
        (barrier::Claims::new(), false),
        (declared, true),
    ] {
        let s = setup().await;
        sqlx::raw_sql(
            "CREATE TABLE log (at BIGSERIAL PRIMARY KEY, saga TEXT NOT NULL, what TEXT NOT NULL);
             CREATE TABLE alone (saga TEXT NOT NULL)",
        )
        .execute(&s.pool)
        .await
        .unwrap();
        let step = SkipsOrLogs(Logged {
            outbox: s.outbox(),
            alone: as_statement,
        });
        let go = |saga: &str| Envelope::new("test", saga, None, &Go { skip: false });
        let skip = |saga: &str| Envelope::new("test", saga, None, &Go { skip: true });
        let back = |saga: &str| Envelope::new("test", saga, None, &Back {});
        let alone = |envelope: Envelope| {
            let (pool, step, claims) = (&s.pool, &step, &claims);
            async move {
                if as_statement {
                    let mut conn = pool.acquire().await.unwrap();
                    let event = GoOrBack::decode(&envelope).unwrap();
                    inbox::apply_alone_or_in_tx(&mut conn, step, claims, &envelope, event)
                        .await
                        .unwrap()
                } else {
                    inbox::apply(pool, step, claims, &envelope).await.unwrap()
                }
            }
        };
        // Alone: work, a repeat of the trigger, then the compensation.
        assert_eq!(alone(go("forward")).await, Outcome::Applied);
        alone(go("forward")).await;
        alone(back("forward")).await;
        alone(back("forward")).await;
        // Alone: the compensation first, then the late trigger.
        alone(back("early")).await;
        alone(go("early")).await;
        // A handler that leaves its step alone leaves no barrier row behind.
        alone(skip("skipped")).await;
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM choreo_barrier WHERE saga_id = 'skipped'")
                .fetch_one(&s.pool)
                .await
                .unwrap();
        assert_eq!(rows, 0, "a claim its handler did not take was left behind");
        alone(go("skipped")).await;
        // A trigger alone went as one statement only where its claim was
        // new: not the repeat, not the one after its compensation.
        let alone_sagas: Vec<String> = sqlx::query_scalar("SELECT saga FROM alone ORDER BY saga")
            .fetch_all(&s.pool)
            .await
            .unwrap();
        let expected_alone: &[&str] = if as_statement {
            &["forward", "skipped"]
        } else {
            &[]
        };
        assert_eq!(alone_sagas, expected_alone);
        // In one batch: one saga's trigger then compensation, another's the
        // other way round, a repeated trigger, a skipped one, and a trigger
        // delivered twice.
        let twice = go("twice");
        let events = [
            go("batch-forward"),
            back("batch-early"),
            go("batch-forward"),
            back("batch-forward"),
            go("batch-early"),
            skip("batch-skipped"),
            go("batch-skipped"),
            twice.clone(),
            twice,
        ];
        let outcomes = inbox::apply_as_batch(&s.pool, &step, &claims, &events)
            .await
            .unwrap();
        assert_eq!(outcomes.last(), Some(&Outcome::Duplicate));
        let story: Vec<(String, String)> = sqlx::query_as("SELECT saga, what FROM log ORDER BY at")
            .fetch_all(&s.pool)
            .await
            .unwrap();
        let barrier: Vec<(String, String)> =
            sqlx::query_as("SELECT saga_id, state FROM choreo_barrier ORDER BY saga_id")
                .fetch_all(&s.pool)
                .await
                .unwrap();
        // Each event a step wrote is in the outbox in the order its effects
        // ran, in a batch too (where they are written together at its end).
        // (A step's work writes Ping 1, its compensation Ping 2.)
        let written: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT saga_id, payload FROM choreo_outbox ORDER BY seq")
                .fetch_all(&s.pool)
                .await
                .unwrap();
        let written: Vec<(String, u32)> = written
            .into_iter()
            .map(|(saga, payload)| {
                let ping: Ping = Envelope::from_bytes(&payload).unwrap().payload().unwrap();
                (saga, ping.n)
            })
            .collect();
        let expected_written: Vec<(String, u32)> = story
            .iter()
            .map(|(saga, what)| (saga.clone(), if what == "work" { 1 } else { 2 }))
            .collect();
        assert_eq!(written, expected_written);
        stories.push((story, barrier));
    }
    let expected_story = [
        ("forward", "work"),
        ("forward", "Work"),
        ("early", "NeverDone"),
        ("skipped", "work"),
        ("batch-forward", "work"),
        ("batch-early", "NeverDone"),
        ("batch-forward", "Work"),
        ("batch-skipped", "work"),
        ("twice", "work"),
    ];
    let expected_barrier = [
        ("batch-early", "compensated_before_action"),
        ("batch-forward", "compensated"),
        ("batch-skipped", "done"),
        ("early", "compensated_before_action"),
        ("forward", "compensated"),
        ("skipped", "done"),
        ("twice", "done"),
    ];
    let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    for (story, barrier) in &stories {
        assert_eq!(story, &owned(&expected_story));
        assert_eq!(barrier, &owned(&expected_barrier));
    }
}

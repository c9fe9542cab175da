//! The order service: takes orders over gRPC, follows each one through the
//! saga by the events of the other services, and cancels what stalls.
pub mod deadline;
pub mod domain;
pub mod gauges;
pub mod grpc;
pub mod handler;
pub mod placer;
pub mod store;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use choreo::cleanup::Erasure;
use choreo::runtime::{Context, Parts};
use contracts::order::v1::order_service_server::{OrderServiceServer, SERVICE_NAME};

/// The order service's business settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Rules {
    /// Seconds an open order may go without progress before it is cancelled.
    #[arg(long, env = "ORDER_DEADLINE_SECS", default_value_t = 30)]
    pub deadline_secs: u64,
    /// How often overdue orders are looked for, in milliseconds.
    #[arg(long, env = "DEADLINE_CHECK_MS", default_value_t = 1000)]
    pub deadline_check_ms: u64,
    /// WatchOrder streams open at once, at most (past it: RESOURCE_EXHAUSTED).
    #[arg(long, env = "WATCH_LIMIT", default_value_t = 1000)]
    pub watch_limit: usize,
}

/// A customer's contact address is needed until the saga ends (notification
/// reads it from `order.created`); it is erased from ended orders once their
/// retention has passed. The order's history (lines, timeline, status
/// changes) stays; none of it carries the address.
pub const ERASE_CONTACTS: Erasure = Erasure {
    what: "contact addresses of ended orders",
    statement: "UPDATE orders SET contact = '', erased_at = now()
                WHERE erased_at IS NULL AND status IN ('COMPLETED', 'CANCELLED')
                  AND updated_at < now() - make_interval(secs => $1)",
};

impl Rules {
    /// Why the deadline is too short for the ack wait `ack_wait_secs`, if
    /// it is: an event whose delivery was lost (its node killed or cut off)
    /// comes again only after the ack wait, and an order that waits on it
    /// must not run out of time meanwhile. Two ack waits leave room for one
    /// lost delivery and the step's own time.
    pub fn deadline_too_short(&self, ack_wait_secs: u64) -> Option<String> {
        (self.deadline_secs < 2 * ack_wait_secs).then(|| {
            format!(
                "ORDER_DEADLINE_SECS ({}) is less than two ack waits (ACK_WAIT_SECS {ack_wait_secs}): \
                 an event whose delivery a broker failover lost comes again only after the ack wait, \
                 so its order may be cancelled by its deadline meanwhile; raise the deadline or lower the ack wait",
                self.deadline_secs
            )
        })
    }
}

pub fn parts(context: &Context, rules: Rules) -> Parts<handler::OrderHandler> {
    if let Some(warning) = rules.deadline_too_short(context.config.ack_wait_secs) {
        tracing::warn!("{warning}");
    }
    let deadline = Duration::from_secs(rules.deadline_secs);
    context.tasks.spawn(deadline::run(
        context.pool.clone(),
        context.outbox.clone(),
        deadline,
        Duration::from_millis(rules.deadline_check_ms),
        context.shutdown.clone(),
    ));
    context.tasks.spawn(gauges::sample_statuses(
        context.pool.clone(),
        Duration::from_secs(2),
        context.shutdown.clone(),
    ));
    let watches = watch::Watches::new(rules.watch_limit, context.shutdown.clone());
    context
        .tasks
        .spawn(watches.clone().listen(context.pool.clone()));
    let api = grpc::OrderApi {
        pool: context.api_pool.clone(),
        outbox: context.outbox.clone(),
        deadline,
        placer: placer::Placer::new(context.api_pool.clone(), context.outbox.clone(), deadline),
        watches,
    };
    Parts {
        handler: Arc::new(handler::OrderHandler { deadline }),
        routes: tonic::service::Routes::new(OrderServiceServer::new(api)),
        service_names: vec![SERVICE_NAME],
        descriptor: contracts::DESCRIPTOR_SET,
        admin_methods: vec![],
        erasures: vec![ERASE_CONTACTS],
    }
}

#[cfg(test)]
mod tests {
    use super::Rules;

    #[test]
    fn the_shipped_deadline_outlasts_two_of_the_shipped_ack_waits() {
        let rules: Rules = choreo::config::defaults_of(&[]);
        let ack_wait = choreo::Config::defaults().ack_wait_secs;
        assert_eq!(rules.deadline_too_short(ack_wait), None);
    }

    #[test]
    fn a_deadline_within_two_ack_waits_is_named_with_both_settings() {
        let rules = Rules {
            deadline_secs: 30,
            ..choreo::config::defaults_of(&[])
        };
        let warning = rules.deadline_too_short(30).expect("30 s is one ack wait");
        assert!(warning.contains("ORDER_DEADLINE_SECS (30)"), "{warning}");
        assert!(warning.contains("ACK_WAIT_SECS 30"), "{warning}");
        assert_eq!(rules.deadline_too_short(15), None);
    }
}

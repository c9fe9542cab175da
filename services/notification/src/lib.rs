//! The notification service: tells customers their order is on its way, and
//! takes it back when the order is compensated.
pub mod dispatch;
pub mod grpc;
pub mod handler;
pub mod message;
pub mod sender;

use std::sync::Arc;
use std::time::Duration;

use choreo::cleanup::Erasure;
use choreo::runtime::{Context, Parts};
use contracts::notification::v1::notification_service_server::{
    NotificationServiceServer, SERVICE_NAME,
};

/// How often the dispatcher looks for due messages when nothing woke it.
const DISPATCH_POLL: Duration = Duration::from_secs(1);
/// What the dispatcher sends at once: 2 batches of up to 32 messages.
const DISPATCH_LIMITS: dispatch::Limits = dispatch::Limits {
    workers: 2,
    batch: 32,
};

/// Recipients, bodies and the queued event (which carries the address) of
/// messages that are settled (sent, withdrawn or failed) are erased once
/// their retention has passed; what was sent, when and of which kind stays.
pub const ERASE_MESSAGES: Erasure = Erasure {
    what: "recipients and bodies of settled notifications",
    statement: "UPDATE notifications
                SET recipient = '', customer = '', body = '', cause = NULL, erased_at = now()
                WHERE erased_at IS NULL AND status <> 'PENDING'
                  AND COALESCE(sent_at, queued_at) < now() - make_interval(secs => $1)",
};

pub fn parts(context: &Context) -> Parts<handler::NotificationHandler> {
    let sender: Arc<dyn sender::Sender> = Arc::new(sender::LogSender);
    let (due, queued) = tokio::sync::mpsc::unbounded_channel();
    context.tasks.spawn(dispatch::run(
        context.pool.clone(),
        context.outbox.clone(),
        sender.clone(),
        queued,
        DISPATCH_POLL,
        DISPATCH_LIMITS,
        context.shutdown.clone(),
    ));
    Parts {
        handler: Arc::new(handler::NotificationHandler {
            outbox: context.outbox.clone(),
            config: context.config.clone(),
            channel: sender.channel().to_owned(),
            due: Some(due),
        }),
        routes: tonic::service::Routes::new(NotificationServiceServer::new(
            grpc::NotificationApi {
                pool: context.api_pool.clone(),
            },
        )),
        service_names: vec![SERVICE_NAME],
        descriptor: contracts::DESCRIPTOR_SET,
        admin_methods: vec![],
        erasures: vec![ERASE_MESSAGES],
    }
}

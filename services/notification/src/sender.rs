//! How a message reaches a customer. The shipped sender writes it to the log;
//! a real one (SMTP, SMS) implements [`Sender`] and plugs into `parts`.
//!
//! A sender is called inside the handler's transaction, after the row that
//! records the message is written: if the commit then fails, the event is
//! redelivered and the message may go out again. A real sender should pass the
//! notification id as its provider's idempotency key.

#[async_trait::async_trait]
pub trait Sender: Send + Sync + 'static {
    /// The channel name recorded with each message, e.g. "email".
    fn channel(&self) -> &str;
    async fn send(&self, notification_id: &str, recipient: &str, text: &str) -> Result<(), String>;
}

/// Logs each message instead of delivering it.
pub struct LogSender;

#[async_trait::async_trait]
impl Sender for LogSender {
    fn channel(&self) -> &str {
        "email (log)"
    }

    async fn send(&self, notification_id: &str, recipient: &str, text: &str) -> Result<(), String> {
        tracing::info!(notification_id, recipient, text, "notification sent");
        Ok(())
    }
}

/// Whether a contact address can be reached: an e-mail address whose domain
/// is not under `.invalid`, the top-level domain reserved never to exist (RFC 2606).
pub fn reachable(contact: &str) -> Result<(), String> {
    if contact.is_empty() {
        return Err("the customer left no contact address".into());
    }
    match contact.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && domain.contains('.') && !domain.contains('@') =>
        {
            if domain.to_ascii_lowercase().ends_with(".invalid") {
                Err(format!(
                    "mail to {contact} bounced: domain {domain} does not exist"
                ))
            } else {
                Ok(())
            }
        }
        _ => Err(format!("contact {contact:?} is not an e-mail address")),
    }
}

#[cfg(test)]
mod tests {
    use super::reachable;

    #[test]
    fn reachability_follows_the_address() {
        assert!(reachable("ada@example.com").is_ok());
        assert!(reachable("").unwrap_err().contains("no contact"));
        assert!(
            reachable("ada@nowhere.invalid")
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            reachable("not-an-address")
                .unwrap_err()
                .contains("not an e-mail")
        );
    }
}

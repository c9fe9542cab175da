//! How a message reaches a customer. The shipped sender writes it to the log;
//! a real one (SMTP, SMS) implements [`Sender`] and plugs into `parts`.
//!
//! A sender is called by the [`crate::dispatch`]er after the handler's
//! transaction has committed, never inside it. If the service dies between
//! the provider's answer and the commit that records it, the message is sent
//! again with the same notification id: a real sender passes that id as its
//! provider's idempotency key, which is what makes the second send a no-op.

/// Why a message did not go out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// It never will (no such address, a hard bounce): the order cannot be
    /// told, and a confirmation that cannot go out fails the order.
    #[error("undeliverable: {0}")]
    Undeliverable(String),
    /// Not now (the provider is down, a rate limit): tried again later.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

#[async_trait::async_trait]
pub trait Sender: Send + Sync + 'static {
    /// The channel name recorded with each message, e.g. "email".
    fn channel(&self) -> &str;
    async fn send(
        &self,
        notification_id: &str,
        recipient: &str,
        text: &str,
    ) -> Result<(), SendError>;
}

/// The line the log sender writes for each message it "delivers" (the chaos
/// suite counts these per notification id: how often the provider was called).
pub const LOG_SENDER_DELIVERED: &str = "delivered by the log sender";

/// Logs each message instead of delivering it. Mail to an address that
/// cannot exist "bounces" (see [`reachable`]), so the failure path can be
/// triggered on purpose.
pub struct LogSender;

#[async_trait::async_trait]
impl Sender for LogSender {
    fn channel(&self) -> &str {
        "email (log)"
    }

    async fn send(
        &self,
        notification_id: &str,
        recipient: &str,
        text: &str,
    ) -> Result<(), SendError> {
        reachable(recipient).map_err(SendError::Undeliverable)?;
        let recipient = masked(recipient);
        tracing::info!(notification_id, %recipient, text, "{LOG_SENDER_DELIVERED}");
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
                Err(format!("mail bounced: domain {domain} does not exist"))
            } else {
                Ok(())
            }
        }
        _ => Err("the contact is not an e-mail address".into()),
    }
}

/// A contact address as logs and reasons may show it: enough for an operator
/// to tell addresses apart (first letter, domain), not the address itself.
pub fn masked(contact: &str) -> String {
    let first = contact.chars().next().map(String::from).unwrap_or_default();
    match contact.split_once('@') {
        Some((_, domain)) => format!("{first}***@{domain}"),
        None => format!("{first}***"),
    }
}

/// `text` with every occurrence of `contact` masked: a provider's error may
/// quote the address, and it must not travel on into reasons and logs.
pub fn scrubbed(text: &str, contact: &str) -> String {
    if contact.is_empty() {
        return text.to_owned();
    }
    text.replace(contact, &masked(contact))
}

#[cfg(test)]
mod tests {
    use super::{masked, reachable, scrubbed};

    #[test]
    fn addresses_are_masked_wherever_they_would_be_shown() {
        assert_eq!(masked("ada@example.com"), "a***@example.com");
        assert_eq!(masked("0171 555"), "0***");
        assert_eq!(
            scrubbed("ada@example.com bounced", "ada@example.com"),
            "a***@example.com bounced"
        );
        assert!(
            !reachable("ada@nowhere.invalid")
                .unwrap_err()
                .contains("ada")
        );
    }

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

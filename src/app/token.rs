//! What a session request was for: its reply comes back with it, and the
//! sidecar sends it to the room that asked (the bootstrap, or a stage).

use crate::discovery::TopicKey;
use crate::forward::DeliveryId;
use crate::wamp::{RegistrationId, SubscriptionId};

/// What a session request was for; its reply comes back with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    MetaSubscribe(&'static str),
    List,
    Get(RegistrationId),
    Subscribe(TopicKey),
    Unsubscribe(SubscriptionId),
    Deliver(DeliveryId),
    /// `wamp.registration.count_callees`, for `/status`.
    CountCallees(RegistrationId),
}

impl From<DeliveryId> for Token {
    fn from(id: DeliveryId) -> Token {
        Token::Deliver(id)
    }
}

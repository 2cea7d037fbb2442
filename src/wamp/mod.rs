//! A WAMP v2 client: pure protocol (`message`, `codec`, `auth`, `session`)
//! with one async piece on top (`client`). Nothing here knows about
//! shared subscriptions.

pub mod id;
pub mod value;

pub use id::{PublicationId, RegistrationId, RequestId, SessionId, SubscriptionId};
pub use value::{Dict, Value};

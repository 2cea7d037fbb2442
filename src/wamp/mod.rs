//! A WAMP v2 client: pure protocol (`message`, `codec`, `auth`, `session`),
//! the socket half of an event loop on top (`connection`), and a
//! handle-based client driving one (`client`). Nothing here knows about
//! shared subscriptions.

pub mod auth;
pub mod batch;
pub mod client;
pub mod codec;
pub mod connection;
mod deadlines;
pub mod id;
pub mod message;
pub mod raw;
pub mod session;
pub mod tls;
pub mod value;
mod write;

pub use client::{CallResult, Client, Incoming, IncomingRx};
pub use codec::Serializer;
pub use connection::{ClientConfig, CloseReason, ConnectError, Connection};
pub use id::{PublicationId, RegistrationId, RequestId, SessionId, SubscriptionId};
pub use message::{Event, Invocation, Message, Payload};
pub use raw::{RawEvent, RawPayload};
pub use session::{RequestError, SessionInfo, WampError};
pub use value::{Dict, Value};

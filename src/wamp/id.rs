//! WAMP identifiers as newtypes, so a subscription id can never be passed
//! where a registration id is expected. Pure data; no IO.

use std::fmt;

/// The largest id WAMP allows: ids are integers in `[1, 2^53]` so that they
/// survive a round trip through an IEEE double (JavaScript peers).
pub const MAX_ID: u64 = 1 << 53;

macro_rules! wamp_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

wamp_id!(
    /// A request id, chosen by us: sequential per session, starting at 1.
    RequestId
);
wamp_id!(
    /// A session id, chosen by the router in WELCOME.
    SessionId
);
wamp_id!(
    /// A subscription id, chosen by the router in SUBSCRIBED.
    SubscriptionId
);
wamp_id!(
    /// A registration id, chosen by the router in REGISTERED.
    RegistrationId
);
wamp_id!(
    /// A publication id, chosen by the router for every published event.
    PublicationId
);

impl RequestId {
    /// The id that follows this one. WAMP request ids wrap from 2^53 back to 1
    /// (a session would need to live for centuries at our rates to get there).
    pub fn next(self) -> RequestId {
        if self.0 >= MAX_ID {
            RequestId(1)
        } else {
            RequestId(self.0 + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_count_up_from_one_and_wrap_at_the_wamp_limit() {
        assert_eq!(RequestId(1).next(), RequestId(2));
        assert_eq!(RequestId(MAX_ID - 1).next(), RequestId(MAX_ID));
        assert_eq!(RequestId(MAX_ID).next(), RequestId(1));
    }
}

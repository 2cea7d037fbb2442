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

/// A hasher for maps and sets keyed by WAMP ids and our own sequential ids,
/// which sit on the per-event path (pending requests, recent publications,
/// subscriptions, deliveries in flight, key lines). The
/// std default, SipHash, is built to resist hash flooding and costs ~20 ns
/// a lookup; an id needs only one multiplication (Fibonacci hashing, so that
/// sequential request ids still spread over the table's high bits). Flooding
/// is not a concern here: these maps are bounded (in-flight requests, a
/// 4096-id window), and a router able to choose colliding ids can simply
/// flood us with events instead.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by the id newtypes (they hash one u64); correct anyway.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
}

/// `BuildHasher` for [`IdHasher`]: `HashMap<RequestId, V, IdHashing>`.
pub type IdHashing = std::hash::BuildHasherDefault<IdHasher>;

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

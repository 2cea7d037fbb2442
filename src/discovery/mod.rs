//! Discovery: which topics to subscribe to, given the dealer's registrations.
//! May call `crate::wamp` data types and its own submodules: [`meta`]
//! (payload parsing) and [`topic`] (URI mapping).

pub mod meta;
pub mod topic;

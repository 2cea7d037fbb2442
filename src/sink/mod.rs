//! Where accepted events go: a CALL through the router (`wamp`) or an RPUSH
//! onto a Redis list (`redis`). Each sink turns one delivery attempt into an
//! outcome the delivery queue understands; neither retries on its own.

pub mod redis;
pub mod wamp;

//! subtocall: shared subscriptions for WAMP routers.
//!
//! ```text
//!  main.rs     config + tracing + signals; runs the app until shutdown
//!  app         the event loop: owns the router connection and the state
//!  discovery   registrations -> subscriptions (sans-IO)
//!  forward     the forwarding core: queue, in-flight bound, retries (sans-IO)
//!  sink        where events go (WAMP call, Redis list); typed outcomes
//!  wamp        connection (the socket half of a loop) over a sans-IO session,
//!              codec, auth and message types; knows nothing of the app
//! ```

pub mod app;
pub mod check;
pub mod config;
pub mod discovery;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod sink;
pub mod status;
pub mod streams;
pub mod wamp;

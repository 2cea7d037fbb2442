//! subtocall: shared subscriptions for WAMP routers.
//!
//! ```text
//!  main.rs     config + tracing + signals; runs the app until shutdown
//!  app         discovery (registrations -> subscriptions) and forwarding
//!  wamp        client (the one task that owns the socket) over a sans-IO
//!              session, codec, auth and message types; knows nothing of the app
//! ```

pub mod app;
pub mod check;
pub mod config;
pub mod discovery;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod sink;
pub mod wamp;

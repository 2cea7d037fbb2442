//! Why the sidecar stops with a non-zero exit code.

use crate::wamp::ConnectError;

/// Why the sidecar stops with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The router refused us for good (credentials, realm, TLS, URL).
    #[error("cannot join the router: {0}")]
    Connect(ConnectError),
    #[error("giving up after {attempts} consecutive failed connection attempts; last: {last}")]
    TooManyFailures { attempts: u32, last: String },
    /// The router does not let our role use the registration meta API.
    #[error(
        "{what} was refused: {error}. The sidecar's role needs {permission} (see doc/crossbar.md)"
    )]
    MetaApi {
        what: String,
        error: String,
        permission: &'static str,
    },
    #[error("cannot start: {0}")]
    Setup(String),
}

//! TLS client configuration for `wss://`: rustls with the webpki root set,
//! the system's trust store and optionally an extra CA file (for routers with
//! a private CA). Reads files; no network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why a TLS configuration could not be built. A configuration problem: it
/// will not fix itself, so callers treat it as fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}: {detail}")]
    CaFile { path: PathBuf, detail: String },
    #[error("CA file {0} holds no PEM certificate")]
    EmptyCaFile(PathBuf),
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// Builds the rustls client configuration. Certificates from the system store
/// that fail to parse are skipped (a broken system bundle must not stop a
/// `ws://` deployment); an unreadable extra CA file is an error.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs = read_ca_file(path)?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::EmptyCaFile(path.to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::CaFile {
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaFile(path.to_owned()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_configuration_builds_without_an_extra_ca() {
        assert!(client_config(None).is_ok());
    }

    #[test]
    fn missing_or_empty_ca_file_is_a_clear_error() {
        let missing = Path::new("/nonexistent/ca.pem");
        assert!(matches!(
            client_config(Some(missing)),
            Err(TlsError::CaFile { .. })
        ));
        let dir = std::env::temp_dir().join(format!("subtocall-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert_eq!(
            client_config(Some(&empty)).unwrap_err(),
            TlsError::EmptyCaFile(empty.clone())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

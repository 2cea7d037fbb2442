//! Client authentication: what goes into HELLO and how to answer a CHALLENGE,
//! for anonymous, ticket and WAMP-CRA (plain and salted). Pure; no IO.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};

use super::value::Dict;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// PBKDF2 parameters used when a CHALLENGE has a salt but omits them; these
/// are autobahn's defaults, which Crossbar mirrors.
const DEFAULT_ITERATIONS: u32 = 1000;
const DEFAULT_KEYLEN: u32 = 32;

/// Upper bounds on what a router may ask of us: a CHALLENGE demanding ten
/// billion PBKDF2 rounds would otherwise hang the connection task.
const MAX_ITERATIONS: u32 = 10_000_000;
const MAX_KEYLEN: u32 = 1024;

/// How the client authenticates. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Ticket { authid: String, ticket: String },
    WampCra { authid: String, secret: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Ticket { authid, .. } => f
                .debug_struct("Ticket")
                .field("authid", authid)
                .field("ticket", &"***")
                .finish(),
            Credentials::WampCra { authid, .. } => f
                .debug_struct("WampCra")
                .field("authid", authid)
                .field("secret", &"***")
                .finish(),
        }
    }
}

/// Why a CHALLENGE could not be answered. Terminal for the connection
/// attempt: retrying with the same credentials would fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("router challenged with authmethod {got:?}, but we offered only {offered:?}")]
    UnexpectedMethod { got: String, offered: &'static str },
    #[error("WAMP-CRA challenge is missing the `challenge` string")]
    MissingChallenge,
    #[error("WAMP-CRA challenge has invalid key derivation parameters: {0}")]
    BadSaltParameters(String),
}

impl Credentials {
    /// The `authmethods` to offer in HELLO.
    pub fn authmethods(&self) -> &'static [&'static str] {
        match self {
            Credentials::Anonymous => &["anonymous"],
            Credentials::Ticket { .. } => &["ticket"],
            Credentials::WampCra { .. } => &["wampcra"],
        }
    }

    /// The `authid` to put in HELLO, if any.
    pub fn authid(&self) -> Option<&str> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Ticket { authid, .. } | Credentials::WampCra { authid, .. } => {
                Some(authid)
            }
        }
    }

    /// Answers a CHALLENGE: the AUTHENTICATE signature.
    pub fn respond(&self, authmethod: &str, extra: &Dict) -> Result<String, AuthError> {
        match (self, authmethod) {
            (Credentials::Ticket { ticket, .. }, "ticket") => Ok(ticket.clone()),
            (Credentials::WampCra { secret, .. }, "wampcra") => {
                let challenge = extra
                    .get_str("challenge")
                    .ok_or(AuthError::MissingChallenge)?;
                let key = match extra.get_str("salt") {
                    None => secret.clone(),
                    Some(salt) => {
                        let iterations = param(extra, "iterations", DEFAULT_ITERATIONS)?;
                        let keylen = param(extra, "keylen", DEFAULT_KEYLEN)?;
                        if iterations > MAX_ITERATIONS || keylen > MAX_KEYLEN {
                            return Err(AuthError::BadSaltParameters(format!(
                                "iterations {iterations} (max {MAX_ITERATIONS}), keylen {keylen} (max {MAX_KEYLEN})"
                            )));
                        }
                        derive_key(secret, salt, iterations, keylen as usize)
                    }
                };
                Ok(sign(key.as_bytes(), challenge))
            }
            (_, got) => Err(AuthError::UnexpectedMethod {
                got: got.to_owned(),
                offered: self.authmethods()[0],
            }),
        }
    }
}

fn param(extra: &Dict, key: &str, default: u32) -> Result<u32, AuthError> {
    match extra.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| AuthError::BadSaltParameters(format!("{key} is {v:?}"))),
    }
}

/// WAMP-CRA signature: base64(HMAC-SHA256(key, challenge)), the challenge
/// signed byte for byte as received (never re-serialised).
pub fn sign(key: &[u8], challenge: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(challenge.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Salted WAMP-CRA key: base64(PBKDF2-HMAC-SHA256(secret, salt)). The base64
/// *text* is what the HMAC is keyed with, not the raw derived bytes.
pub fn derive_key(secret: &str, salt: &str, iterations: u32, keylen: usize) -> String {
    let mut out = vec![0u8; keylen];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(secret.as_bytes(), salt.as_bytes(), iterations, &mut out);
    BASE64.encode(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN_CHALLENGE: &str = r#"{"authid": "backend", "authrole": "backend", "authmethod": "wampcra", "authprovider": "static", "session": 1273811465337858, "nonce": "yaIJ3p4nj8CPXkDIedepnRYwGt6aPAA4jxh37WXvAolxGVmyP79Qtz5tYqw++VWn", "timestamp": "2026-11-22T10:21:58.893Z"}"#;
    const SALTED_CHALLENGE: &str = r#"{"authid": "salted", "authrole": "backend", "authmethod": "wampcra", "authprovider": "static", "session": 8629904171912300, "nonce": "KkUn1VQTiw5/jAlzxZCupZo7fPXYnIFe4EyYE/UgQEzfEt4eCV9wOc5FrS1q7nvh", "timestamp": "2026-11-22T10:22:05.202Z"}"#;

    fn cra(authid: &str, secret: &str) -> Credentials {
        Credentials::WampCra {
            authid: authid.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn plain_wampcra_matches_the_reference_vector() {
        assert_eq!(
            sign(b"secret123", PLAIN_CHALLENGE),
            "F9tgUiXwkJiu+vOVgOMvpo9eC/66Y0tteOo/IE/4LOk="
        );
        let extra = Dict::new().with("challenge", PLAIN_CHALLENGE);
        assert_eq!(
            cra("backend", "secret123").respond("wampcra", &extra),
            Ok("F9tgUiXwkJiu+vOVgOMvpo9eC/66Y0tteOo/IE/4LOk=".into())
        );
    }

    #[test]
    fn salted_key_derivation_matches_the_reference_vectors() {
        assert_eq!(
            derive_key("saltedpass", "salt123", 100, 16),
            "1ql6o/C1hmsawUwlML/2VQ=="
        );
        assert_eq!(
            derive_key("secret123", "salt123", 1000, 32),
            "Eu7CQLfR+/Ffb+275A4s9/6H/RGKYxM4s6IMrsNKzC8="
        );
    }

    #[test]
    fn salted_wampcra_signs_with_the_base64_text_of_the_derived_key() {
        let extra = Dict::new()
            .with("challenge", SALTED_CHALLENGE)
            .with("salt", "salt123")
            .with("iterations", 100u64)
            .with("keylen", 16u64);
        assert_eq!(
            cra("salted", "saltedpass").respond("wampcra", &extra),
            Ok("OKz7dtgjzz+wzI0WiFY6wy0D/Ca5/w1LM6iNXjsmCkI=".into())
        );
    }

    #[test]
    fn salt_without_parameters_uses_autobahn_defaults() {
        let extra = Dict::new().with("challenge", "c").with("salt", "salt123");
        let expected = sign(derive_key("secret123", "salt123", 1000, 32).as_bytes(), "c");
        assert_eq!(
            cra("x", "secret123").respond("wampcra", &extra),
            Ok(expected)
        );
    }

    #[test]
    fn absurd_key_derivation_parameters_are_refused() {
        for (k, v) in [
            ("iterations", u64::MAX),
            ("iterations", 0),
            ("keylen", 1 << 20),
        ] {
            let extra = Dict::new()
                .with("challenge", "c")
                .with("salt", "s")
                .with(k, v);
            assert!(matches!(
                cra("x", "y").respond("wampcra", &extra),
                Err(AuthError::BadSaltParameters(_))
            ));
        }
    }

    #[test]
    fn ticket_is_sent_as_the_signature() {
        let creds = Credentials::Ticket {
            authid: "a".into(),
            ticket: "t0ps3cret".into(),
        };
        assert_eq!(
            creds.respond("ticket", &Dict::new()),
            Ok("t0ps3cret".into())
        );
        assert_eq!(creds.authmethods(), ["ticket"]);
    }

    #[test]
    fn challenge_for_a_method_we_did_not_offer_is_an_error() {
        assert!(matches!(
            Credentials::Anonymous.respond("wampcra", &Dict::new()),
            Err(AuthError::UnexpectedMethod { .. })
        ));
        assert_eq!(
            cra("a", "b").respond("wampcra", &Dict::new()),
            Err(AuthError::MissingChallenge)
        );
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let shown = format!(
            "{:?} {:?}",
            cra("backend", "hunter2-secret"),
            Credentials::Ticket {
                authid: "a".into(),
                ticket: "hunter3-ticket".into()
            }
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(shown.contains("backend"));
    }
}

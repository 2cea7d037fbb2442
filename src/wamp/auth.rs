//! Client authentication: what goes into HELLO and how to answer a CHALLENGE,
//! for anonymous, ticket and WAMP-CRA (plain and salted). No IO and no tokio:
//! a salted key that is expensive to derive is handed out as a [`Derivation`]
//! for the caller to run off its event loop, and kept in a small process-wide
//! cache so that reconnecting does not derive it again. Also how to print a
//! router URL that carries a credential in its query (`?token=…`).

use std::fmt;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use sha2::Digest as _;

use super::value::Dict;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// PBKDF2 parameters used when a CHALLENGE has a salt but omits them; these
/// are autobahn's defaults, which Crossbar mirrors.
const DEFAULT_ITERATIONS: u32 = 1000;
const DEFAULT_KEYLEN: u32 = 32;

/// The most PBKDF2 iterations a salted WAMP-CRA CHALLENGE may ask for.
/// Crossbar's and autobahn's default is 1,000, and OWASP's 2023
/// recommendation for PBKDF2-HMAC-SHA256 is 600,000; a router asking for more
/// than a million is misconfigured or hostile. At the limit the derivation
/// costs about a second of one CPU (ten million took 12 s in a release
/// build), once per process: it runs off the event loop and is cached.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// The longest derived key, in bytes. Every 32 bytes cost another full run of
/// the iterations, and a key longer than SHA-256's 32 bytes adds no strength;
/// Crossbar's default is 32.
pub const MAX_KEYLEN: u32 = 64;

/// How many derived keys the process keeps. One is enough for a router that
/// keeps its salt; the bound keeps a router that changes it on every
/// connection from growing the cache.
const CACHED_KEYS: usize = 4;

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
    /// The salted challenge asks for more work than an honest router would:
    /// refused without deriving anything.
    #[error(
        "WAMP-CRA challenge sets {param} to {asked}, above subtocall's limit of {limit} \
         (Crossbar's default is {default}); the router is misconfigured or hostile"
    )]
    KeyDerivationTooCostly {
        param: &'static str,
        asked: u64,
        limit: u32,
        default: u32,
    },
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

    /// Answers a CHALLENGE: the AUTHENTICATE signature. A salted key not
    /// derived yet (see [`Credentials::derivation`]) is derived here, on the
    /// caller's thread.
    pub fn respond(&self, authmethod: &str, extra: &Dict) -> Result<String, AuthError> {
        match (self, authmethod) {
            (Credentials::Ticket { ticket, .. }, "ticket") => Ok(ticket.clone()),
            (Credentials::WampCra { secret, .. }, "wampcra") => {
                let challenge = extra
                    .get_str("challenge")
                    .ok_or(AuthError::MissingChallenge)?;
                let key = match SaltedKey::of(secret, extra)? {
                    None => secret.clone(),
                    Some(salted) => salted.cached().unwrap_or_else(|| salted.derive()),
                };
                Ok(sign(key.as_bytes(), challenge))
            }
            (_, got) => Err(AuthError::UnexpectedMethod {
                got: got.to_owned(),
                offered: self.authmethods()[0],
            }),
        }
    }

    /// The salted WAMP-CRA key that answering this CHALLENGE needs, when it
    /// is not derived yet. Up to [`MAX_ITERATIONS`] PBKDF2 rounds take up to
    /// a second, too long for an event loop: the caller runs
    /// [`Derivation::run`] on a thread that may block, then calls
    /// [`Credentials::respond`], which finds the key cached. `None` when
    /// there is nothing to derive: not salted WAMP-CRA, the key is cached
    /// already, or the parameters are refused (`respond` says why).
    pub fn derivation(&self, authmethod: &str, extra: &Dict) -> Option<Derivation> {
        let Credentials::WampCra { secret, .. } = self else {
            return None;
        };
        if authmethod != "wampcra" {
            return None;
        }
        let salted = SaltedKey::of(secret, extra).ok()??;
        match salted.cached() {
            Some(_) => None,
            None => Some(Derivation(salted)),
        }
    }
}

/// A salted WAMP-CRA key to derive off the event loop; see
/// [`Credentials::derivation`]. Not `Debug`: it holds the secret.
pub struct Derivation(SaltedKey);

impl Derivation {
    /// Derives the key and caches it; blocks for as long as PBKDF2 takes.
    /// Concurrent runs are serialised, so a key asked for twice at once (a
    /// timed-out connection attempt still deriving when the next one starts)
    /// is derived once and found by the second.
    pub fn run(self) {
        let _one_at_a_time = DERIVING.lock().unwrap_or_else(PoisonError::into_inner);
        if self.0.cached().is_none() {
            self.0.derive();
        }
    }
}

/// Salted keys derived so far, oldest first, at most [`CACHED_KEYS`].
/// Process-wide because a key outlives every connection: each reconnect is a
/// new `Client` and a new `Session`. A `std::sync::Mutex` (this module does
/// not use tokio), held only to look up or to insert, never while deriving.
static CACHE: Mutex<Vec<(KeyId, String)>> = Mutex::new(Vec::new());

/// Held by [`Derivation::run`] while it derives: only on threads that may
/// block, never on the event loop (`respond`, which runs there, does not
/// take it).
static DERIVING: Mutex<()> = Mutex::new(());

/// What a salted key is derived from: the router's parameters and the secret.
#[derive(Clone, PartialEq, Eq)]
struct KeyId {
    /// SHA-256 of the secret: tells secrets apart without another copy of one.
    secret: [u8; 32],
    salt: String,
    iterations: u32,
    keylen: u32,
}

/// One salted key: what it is derived from, and the secret to derive it.
struct SaltedKey {
    id: KeyId,
    secret: String,
}

impl SaltedKey {
    /// The key a CHALLENGE's `extra` asks for, `None` without a salt (plain
    /// WAMP-CRA). Missing parameters take autobahn's defaults; parameters
    /// beyond [`MAX_ITERATIONS`] or [`MAX_KEYLEN`] are refused.
    fn of(secret: &str, extra: &Dict) -> Result<Option<SaltedKey>, AuthError> {
        let Some(salt) = extra.get_str("salt") else {
            return Ok(None);
        };
        let iterations = param(extra, "iterations", DEFAULT_ITERATIONS, MAX_ITERATIONS)?;
        let keylen = param(extra, "keylen", DEFAULT_KEYLEN, MAX_KEYLEN)?;
        Ok(Some(SaltedKey {
            id: KeyId {
                secret: sha2::Sha256::digest(secret.as_bytes()).into(),
                salt: salt.to_owned(),
                iterations,
                keylen,
            },
            secret: secret.to_owned(),
        }))
    }

    fn cached(&self) -> Option<String> {
        let cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .iter()
            .find(|(id, _)| *id == self.id)
            .map(|(_, key)| key.clone())
    }

    /// Derives the key (slow: see [`MAX_ITERATIONS`]) and caches it.
    fn derive(&self) -> String {
        let id = &self.id;
        let key = derive_key(&self.secret, &id.salt, id.iterations, id.keylen as usize);
        let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        if !cache.iter().any(|(cached, _)| cached == id) {
            if cache.len() >= CACHED_KEYS {
                cache.remove(0);
            }
            cache.push((id.clone(), key.clone()));
        }
        key
    }
}

/// A positive whole-number parameter of a salted challenge, `default` when
/// absent; above `limit` it is refused as too costly.
fn param(extra: &Dict, key: &'static str, default: u32, limit: u32) -> Result<u32, AuthError> {
    let Some(value) = extra.get(key) else {
        return Ok(default);
    };
    match value.as_u64() {
        Some(0) | None => Err(AuthError::BadSaltParameters(format!(
            "{key} is {value:?}, not a positive whole number"
        ))),
        Some(asked) if asked > u64::from(limit) => Err(AuthError::KeyDerivationTooCostly {
            param: key,
            asked,
            limit,
            default,
        }),
        // At most `limit`, a u32.
        Some(asked) => Ok(asked as u32),
    }
}

/// `url` with `***` for the value of every query parameter `hide` picks by
/// its key (a router may take a ticket or token there); the fragment is
/// treated the same way, and a parameter without `=` is hidden whole when
/// `hide` picks it. Works on the text, so a value that is not a valid URL is
/// redacted too; the rest is kept as written.
pub fn redact_query(url: &str, hide: impl Fn(&str) -> bool) -> String {
    let Some((base, rest)) = url.split_once('?') else {
        return url.to_owned();
    };
    let redact = |part: &str| {
        part.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if hide(key) => format!("{key}=***"),
                None if !pair.is_empty() && hide(pair) => "***".to_owned(),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    match rest.split_once('#') {
        Some((query, fragment)) => format!("{base}?{}#{}", redact(query), redact(fragment)),
        None => format!("{base}?{}", redact(rest)),
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
        for (k, v) in [("iterations", 0u64), ("keylen", 0)] {
            let extra = Dict::new()
                .with("challenge", "c")
                .with("salt", "s")
                .with(k, v);
            assert!(matches!(
                cra("x", "y").respond("wampcra", &extra),
                Err(AuthError::BadSaltParameters(_))
            ));
        }
        let extra = Dict::new()
            .with("challenge", "c")
            .with("salt", "s")
            .with("iterations", "many");
        assert!(matches!(
            cra("x", "y").respond("wampcra", &extra),
            Err(AuthError::BadSaltParameters(_))
        ));
    }

    #[test]
    fn key_derivation_beyond_the_limits_is_refused_naming_the_limit() {
        for (k, v, limit) in [
            ("iterations", u64::from(MAX_ITERATIONS) + 1, MAX_ITERATIONS),
            ("iterations", u64::MAX, MAX_ITERATIONS),
            ("keylen", u64::from(MAX_KEYLEN) + 1, MAX_KEYLEN),
        ] {
            let extra = Dict::new()
                .with("challenge", "c")
                .with("salt", "s")
                .with(k, v);
            let creds = cra("x", "y");
            assert!(creds.derivation("wampcra", &extra).is_none());
            let err = creds
                .respond("wampcra", &extra)
                .expect_err("beyond the limit");
            assert!(
                matches!(err, AuthError::KeyDerivationTooCostly { asked, limit: l, .. } if asked == v && l == limit),
                "{err:?}"
            );
            let shown = err.to_string();
            assert!(
                shown.contains(&v.to_string()) && shown.contains(&limit.to_string()),
                "{shown}"
            );
        }
        // The limits themselves are allowed (checked without deriving).
        let at_limit = Dict::new()
            .with("salt", "s")
            .with("iterations", u64::from(MAX_ITERATIONS))
            .with("keylen", u64::from(MAX_KEYLEN));
        assert!(SaltedKey::of("y", &at_limit).is_ok_and(|k| k.is_some()));
    }

    #[test]
    fn a_salted_key_is_derived_once_by_the_derivation_then_found_by_respond() {
        let creds = cra("x", "derived-once-secret");
        let extra = Dict::new()
            .with("challenge", "c")
            .with("salt", "derived-once-salt")
            .with("iterations", 10u64);
        let derivation = creds
            .derivation("wampcra", &extra)
            .expect("not derived yet");
        derivation.run();
        assert!(creds.derivation("wampcra", &extra).is_none(), "cached now");
        let expected = sign(
            derive_key("derived-once-secret", "derived-once-salt", 10, 32).as_bytes(),
            "c",
        );
        assert_eq!(creds.respond("wampcra", &extra), Ok(expected));
        // Another secret with the same parameters has a key of its own.
        assert!(
            cra("x", "another-secret")
                .derivation("wampcra", &extra)
                .is_some()
        );
        // Nothing to derive for plain WAMP-CRA or for a ticket.
        let plain = Dict::new().with("challenge", "c");
        assert!(creds.derivation("wampcra", &plain).is_none());
        let ticket = Credentials::Ticket {
            authid: "a".into(),
            ticket: "t".into(),
        };
        assert!(ticket.derivation("ticket", &extra).is_none());
    }

    #[test]
    fn the_key_cache_keeps_only_the_newest_keys() {
        let creds = cra("x", "cache-bound-secret");
        let salted = |salt: &str| {
            Dict::new()
                .with("challenge", "c")
                .with("salt", salt)
                .with("iterations", 1u64)
        };
        creds.respond("wampcra", &salted("first")).expect("derives");
        assert!(creds.derivation("wampcra", &salted("first")).is_none());
        for n in 0..CACHED_KEYS {
            creds
                .respond("wampcra", &salted(&format!("later-{n}")))
                .expect("derives");
        }
        assert!(
            creds.derivation("wampcra", &salted("first")).is_some(),
            "the oldest key was evicted"
        );
    }

    #[test]
    fn query_values_are_hidden_by_key_and_the_rest_is_kept() {
        let all = |_: &str| true;
        assert_eq!(
            redact_query("wss://r/ws?token=abc&x=1", all),
            "wss://r/ws?token=***&x=***"
        );
        assert_eq!(redact_query("ws://r/ws", all), "ws://r/ws");
        assert_eq!(redact_query("ws://r/ws?", all), "ws://r/ws?");
        assert_eq!(redact_query("ws://r/ws?bare", all), "ws://r/ws?***");
        assert_eq!(
            redact_query("ws://r/ws?t=a=b#k=v", all),
            "ws://r/ws?t=***#k=***"
        );
        assert_eq!(redact_query("not a url?t=1", all), "not a url?t=***");
        let passwords = |key: &str| key == "pass";
        assert_eq!(
            redact_query("unix:///s.sock?db=1&pass=pw#x", passwords),
            "unix:///s.sock?db=1&pass=***#x"
        );
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

//! Values that must never be printed: a `Secret`, a `RedisUrl` whose
//! password and a `WampUrl` whose query values are hidden whenever they are
//! formatted. Also the redaction applied to every raw value quoted in a
//! configuration error.

use std::fmt;
use std::ops::Deref;

use url::Url;

use crate::wamp::auth::redact_query;

/// What is shown instead of a secret.
pub(crate) const HIDDEN: &str = "***";

/// A password, secret or ticket. `Debug` and `Display` print `***`; the only
/// way to the text is [`Secret::expose`], so every use is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the code that authenticates with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

/// A validated `redis://`, `rediss://` or `unix://` URL. `Debug` and
/// `Display` hide its password (also a `pass`/`password` query parameter, as
/// used with `unix://`); [`RedisUrl::expose`] gives the whole URL to the code
/// that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(Url);

impl RedisUrl {
    /// Checks the scheme and that there is a host (`redis`, `rediss`) or a
    /// socket path (`unix`). The message says what is wrong.
    pub fn parse(text: &str) -> Result<RedisUrl, String> {
        let url = Url::parse(text).map_err(|e| e.to_string())?;
        match url.scheme() {
            "redis" | "rediss" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err("has no host".to_string());
                }
            }
            "unix" => {
                if url.path().is_empty() || url.path() == "/" {
                    return Err("has no socket path (write unix:///path/to/redis.sock)".to_string());
                }
            }
            other => return Err(format!("scheme {other}:// is not supported")),
        }
        Ok(RedisUrl(url))
    }

    /// The whole URL, password included, for connecting.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// `rediss://`: connect with TLS.
    pub fn is_tls(&self) -> bool {
        self.0.scheme() == "rediss"
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_redis_url(self.0.as_str()))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", redact_redis_url(self.0.as_str()))
    }
}

/// The router's validated `ws://` or `wss://` URL (no user name or password:
/// those are refused). `Display` and `Debug` hide every query value, where a
/// router may take a ticket or token (`?token=…`). It derefs to the [`Url`]
/// for the code that connects: `as_str()` is the whole URL.
#[derive(Clone, PartialEq, Eq)]
pub struct WampUrl(Url);

impl WampUrl {
    pub(crate) fn new(url: Url) -> WampUrl {
        WampUrl(url)
    }
}

impl Deref for WampUrl {
    type Target = Url;

    fn deref(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for WampUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_query(self.0.as_str(), |_| true))
    }
}

impl fmt::Debug for WampUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WampUrl({:?})", redact_query(self.0.as_str(), |_| true))
    }
}

fn is_password_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password")
}

/// Text made safe to print in an error, even when it is not a valid URL: a
/// password in `user:password@host` becomes `***`, and so does every query
/// value of text with a scheme (`ws://…?token=…`), or else a `pass=` or
/// `password=` query value. The rest is kept as written.
pub(crate) fn redact_value(text: &str) -> String {
    let text = redact_userinfo(text);
    if text.contains("://") {
        redact_query(&text, |_| true)
    } else {
        redact_query(&text, is_password_key)
    }
}

/// A Redis URL as shown: its password and `pass`/`password` query values
/// hidden, other parameters (`db=1`) kept.
pub(crate) fn redact_redis_url(text: &str) -> String {
    redact_query(&redact_userinfo(text), is_password_key)
}

/// Hides what lies between the first `:` of the user info and the last `@`
/// before any query or fragment.
fn redact_userinfo(text: &str) -> String {
    let end = text.find(['?', '#']).unwrap_or(text.len());
    let Some(at) = text[..end].rfind('@') else {
        return text.to_string();
    };
    let userinfo_start = text[..at].rfind('/').map_or(0, |slash| slash + 1);
    match text[userinfo_start..at].find(':') {
        Some(colon) => format!(
            "{}{HIDDEN}{}",
            &text[..=userinfo_start + colon],
            &text[at..]
        ),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_even_in_values_that_are_not_urls() {
        assert_eq!(redact_value("http://:pw@host:1"), "http://:***@host:1");
        assert_eq!(redact_value("redis//:pw@host"), "redis//:***@host");
        assert_eq!(redact_value("user:pw@host"), "user:***@host");
        assert_eq!(redact_value("rediss://u:pw@[::1"), "rediss://u:***@[::1");
        assert_eq!(redact_value("ws://router/ws"), "ws://router/ws");
        assert_eq!(redact_value("30s"), "30s");
        assert_eq!(redact_value("user@host:80"), "user@host:80");
        assert_eq!(
            redact_value("unix:///redis.sock?db=1&pass=pw#x"),
            "unix:///redis.sock?db=***&pass=***#***"
        );
        assert_eq!(
            redact_value("redis//h?db=1&pass=pw"),
            "redis//h?db=1&pass=***"
        );
        assert_eq!(
            redact_redis_url("unix:///redis.sock?db=1&pass=pw#x"),
            "unix:///redis.sock?db=1&pass=***#x"
        );
    }
}

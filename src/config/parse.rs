//! Parsers from one variable's text to its typed value. Pure functions that
//! know nothing of variable names: the caller (`config::Reader`) adds the
//! name, the quoted value and the table's "expected …" text to every error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use url::Url;

use super::redacted::{RedisUrl, Secret};

/// Why a value was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// What exactly is wrong, when more can be said than "expected …".
    pub reason: Option<String>,
}

impl Invalid {
    /// The text is not the kind of value expected at all.
    pub fn syntax() -> Invalid {
        Invalid { reason: None }
    }

    /// The text parsed but breaks a rule, or the parser said why it failed.
    pub fn because(reason: impl Into<String>) -> Invalid {
        Invalid {
            reason: Some(reason.into()),
        }
    }
}

pub(crate) type Parsed<T> = Result<T, Invalid>;

/// The longest duration accepted anywhere: far beyond any sensible setting,
/// and far from overflowing `Instant + Duration`.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// humantime syntax (`30s`, `500ms`, `1h 5m`), or a bare number of seconds.
pub(crate) fn duration(text: &str) -> Parsed<Duration> {
    let text = text.trim();
    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| Invalid::because("is too long; at most 30 days"))?
    } else {
        humantime::parse_duration(text).map_err(|_| Invalid::syntax())?
    };
    if parsed > MAX_DURATION {
        return Err(Invalid::because("is too long; at most 30 days"));
    }
    Ok(parsed)
}

/// A duration of at least `min` (timeouts, intervals, backoffs: below some
/// bound they do harm); the error names the bound.
pub(crate) fn duration_at_least(text: &str, min: Duration) -> Parsed<Duration> {
    let parsed = duration(text)?;
    if parsed < min {
        return Err(Invalid::because(format!(
            "is below the minimum of {}",
            humantime::format_duration(min)
        )));
    }
    Ok(parsed)
}

/// `1/true/yes/on` or `0/false/no/off`, any case.
pub(crate) fn boolean(text: &str) -> Parsed<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Invalid::syntax()),
    }
}

/// A whole number in `min..=max`, as the integer type the caller needs;
/// `_` may group digits (`10_000`).
pub(crate) fn number_in<T: TryFrom<u64>>(text: &str, min: u64, max: u64) -> Parsed<T> {
    let digits: String = text.trim().chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid::syntax());
    }
    match digits.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => {
            T::try_from(n).map_err(|_| Invalid::because("is out of range"))
        }
        _ => Err(Invalid::because("is out of range")),
    }
}

/// A byte size: a plain number, or a number with suffix `KiB`, `MiB` or
/// `GiB` (any case, a space allowed before it), in `1 KiB..=1 GiB`.
pub(crate) fn byte_size(text: &str) -> Parsed<usize> {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let unit = match suffix.trim().to_ascii_lowercase().as_str() {
        "" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        _ => return Err(Invalid::syntax()),
    };
    let number: u64 = number.parse().map_err(|_| Invalid::syntax())?;
    let bytes = number
        .checked_mul(unit)
        .filter(|bytes| (KIB..=GIB).contains(bytes))
        .ok_or_else(|| Invalid::because("is out of range"))?;
    usize::try_from(bytes).map_err(|_| Invalid::because("is out of range"))
}

/// Text that must be present and must not contain whitespace or control
/// characters (realm, marker).
pub(crate) fn word(text: &str) -> Parsed<String> {
    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Invalid::because("contains spaces or control characters"));
    }
    Ok(text.to_string())
}

/// Any text that is not empty (authid, kwarg name, Redis key).
pub(crate) fn non_empty(text: &str) -> Parsed<String> {
    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    Ok(text.to_string())
}

/// A queue name: the namespace of the queue's Redis keys and the consumer
/// group's name. No braces (they would break the per-procedure hash tags),
/// no spaces.
pub(crate) fn queue_name(text: &str) -> Parsed<String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    match text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        Some(c) => Err(Invalid::because(format!("contains {c:?}"))),
        None => Ok(text.to_string()),
    }
}

/// Any text, even empty.
/// `host:port[,host:port...]`, IPv6 hosts in brackets (`[::1]:26379`).
pub(crate) fn host_ports(text: &str) -> Parsed<Vec<(String, u16)>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        let (host, port) = item
            .rsplit_once(':')
            .ok_or_else(|| Invalid::because(format!("{item:?} is not host:port")))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(':') && !item.starts_with('[') {
            return Err(Invalid::because(format!(
                "{item:?} is not host:port (write an IPv6 address as [addr]:port)"
            )));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Invalid::because(format!("{item:?} has no port from 1 to 65535")))?;
        out.push((host.to_owned(), port));
    }
    Ok(out)
}

pub(crate) fn any_text(text: &str) -> Parsed<String> {
    Ok(text.to_string())
}

pub(crate) fn secret(text: &str) -> Parsed<Secret> {
    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    Ok(Secret::new(text))
}

/// The shared-subscription marker: a `word` without `.`, since it is matched
/// against the last URI component.
pub(crate) fn marker(text: &str) -> Parsed<String> {
    let marker = word(text)?;
    if marker.contains('.') {
        return Err(Invalid::because("contains `.`"));
    }
    Ok(marker)
}

/// A `ws://` or `wss://` URL with a host and no credentials in it.
pub(crate) fn websocket_url(text: &str) -> Parsed<Url> {
    let url = Url::parse(text.trim()).map_err(|e| Invalid::because(e.to_string()))?;
    if !matches!(url.scheme(), "ws" | "wss") {
        return Err(Invalid::because(format!(
            "scheme {}:// is not supported",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Invalid::because("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Invalid::because("contains a user name or password"));
    }
    Ok(url)
}

pub(crate) fn redis_url(text: &str) -> Parsed<RedisUrl> {
    RedisUrl::parse(text.trim()).map_err(Invalid::because)
}

/// A regex; a syntax error is reduced to its one-line description (the
/// regex crate's own message spans several lines with a caret drawing).
pub(crate) fn regex(text: &str) -> Parsed<Regex> {
    Regex::new(text).map_err(|e| {
        let full = e.to_string();
        let short = full
            .lines()
            .find_map(|line| line.strip_prefix("error: "))
            .map_or_else(
                || full.split_whitespace().collect::<Vec<_>>().join(" "),
                str::to_string,
            );
        Invalid::because(format!("is not a valid regex: {short}"))
    })
}

/// `none`, `topic`, `kwarg:NAME` or `arg:N`.
pub(crate) fn order_by(text: &str) -> Parsed<crate::config::OrderBy> {
    use crate::config::OrderBy;
    let text = text.trim();
    match text.split_once(':') {
        None if text == "none" => Ok(OrderBy::None),
        None if text == "topic" => Ok(OrderBy::Topic),
        Some(("kwarg", name)) if !name.is_empty() => Ok(OrderBy::Kwarg(name.to_owned())),
        Some(("arg", n)) => n
            .parse()
            .map(OrderBy::Arg)
            .map_err(|_| Invalid::because("arg:N needs N a whole number from 0")),
        _ => Err(Invalid::syntax()),
    }
}

/// `off` (any case) for "no listener", else an `IP:port`.
pub(crate) fn listen_addr(text: &str) -> Parsed<Option<SocketAddr>> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| Invalid::syntax())
}

/// A log filter as `tracing_subscriber::EnvFilter` parses it.
pub(crate) fn log_filter(text: &str) -> Parsed<String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| Invalid::because(format!("is not a valid filter: {e}")))?;
    Ok(text.to_string())
}

/// A file of PEM certificates that can be read now and holds at least one.
/// The certificates themselves are loaded by the WAMP client.
pub(crate) fn ca_file(text: &str) -> Parsed<PathBuf> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    if text.is_empty() {
        return Err(Invalid::because("is empty"));
    }
    let path = PathBuf::from(text);
    let pem = std::fs::read(&path).map_err(|e| Invalid::because(format!("cannot be read: {e}")))?;
    let mut certificates = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|e| Invalid::because(format!("is not valid PEM: {e}")))?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(Invalid::because("contains no PEM certificate"));
    }
    Ok(path)
}

/// One of `choices`, compared ignoring case and surrounding spaces.
pub(crate) fn choice<T: Copy>(text: &str, choices: &[(&str, T)]) -> Parsed<T> {
    let text = text.trim();
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|&(_, value)| value)
        .ok_or_else(Invalid::syntax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_number_is_seconds_and_humantime_syntax_works() {
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1h 5m"), Ok(Duration::from_secs(3900)));
        assert_eq!(duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_that_are_not_durations_or_too_long_are_rejected() {
        assert_eq!(duration("abc"), Err(Invalid::syntax()));
        assert_eq!(duration(""), Err(Invalid::syntax()));
        assert_eq!(duration("-1s"), Err(Invalid::syntax()));
        assert_eq!(duration("1.5"), Err(Invalid::syntax()));
        assert!(duration("31days").is_err());
        assert!(duration("99999999999999999999999").is_err());
        assert_eq!(
            duration_at_least("99ms", Duration::from_millis(100)),
            Err(Invalid::because("is below the minimum of 100ms"))
        );
        assert_eq!(
            duration_at_least("100ms", Duration::from_millis(100)),
            Ok(Duration::from_millis(100))
        );
    }

    #[test]
    fn sizes_take_binary_suffixes_within_one_kib_and_one_gib() {
        assert_eq!(byte_size("1024"), Ok(1024));
        assert_eq!(byte_size("512KiB"), Ok(512 * 1024));
        assert_eq!(byte_size("16 mib"), Ok(16 * 1024 * 1024));
        assert_eq!(byte_size("1GiB"), Ok(1024 * 1024 * 1024));
        assert!(byte_size("1023").is_err());
        assert!(byte_size("2GiB").is_err());
        assert!(byte_size("16MB").is_err());
        assert!(byte_size("MiB").is_err());
        assert!(byte_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn numbers_may_group_digits_with_underscores() {
        assert_eq!(number_in::<u32>("10_000", 1, 10_000_000), Ok(10_000));
        assert!(number_in::<u32>("0", 1, 10).is_err());
        assert!(number_in::<u32>("-1", 0, 10).is_err());
        assert!(number_in::<u32>("1e3", 0, 10_000).is_err());
        assert!(number_in::<u8>("300", 0, 1000).is_err());
    }

    #[test]
    fn regex_errors_are_one_line() {
        let Err(Invalid {
            reason: Some(reason),
        }) = regex("com.(example")
        else {
            panic!("an unclosed group must be rejected");
        };
        assert!(!reason.contains('\n'), "{reason}");
        assert!(reason.contains("unclosed group"), "{reason}");
    }

    #[test]
    fn websocket_urls_need_ws_scheme_and_host_and_no_credentials() {
        assert!(websocket_url("wss://router.example.com/ws").is_ok());
        assert!(websocket_url("ws://[::1]:8080/ws").is_ok());
        assert!(websocket_url("http://router/ws").is_err());
        assert!(websocket_url("ws://").is_err());
        assert!(websocket_url("ws://user:pw@router/ws").is_err());
        assert!(websocket_url("router:8080").is_err());
    }

    #[test]
    fn redis_urls_accept_three_schemes() {
        assert!(redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(redis_url("rediss://:pw@redis.example.com").is_ok());
        assert!(redis_url("unix:///run/redis.sock").is_ok());
        assert!(redis_url("unix://").is_err());
        assert!(redis_url("redis://").is_err());
        assert!(redis_url("http://redis").is_err());
        assert!(redis_url("localhost:6379").is_err());
    }

    #[test]
    fn order_by_names_none_the_topic_a_kwarg_or_an_arg() {
        use crate::config::OrderBy;
        assert_eq!(order_by("none"), Ok(OrderBy::None));
        assert_eq!(order_by(" topic "), Ok(OrderBy::Topic));
        assert_eq!(
            order_by("kwarg:client"),
            Ok(OrderBy::Kwarg("client".into()))
        );
        assert_eq!(order_by("arg:0"), Ok(OrderBy::Arg(0)));
        for bad in ["", "kwarg:", "arg:x", "arg:-1", "key", "Topic"] {
            assert!(order_by(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_filters_are_checked_by_env_filter() {
        assert!(log_filter("info,subtocall=debug").is_ok());
        assert!(log_filter("subtocall[span{x=1}]=trace").is_ok());
        assert!(log_filter("info,subtocall=loud").is_err());
        assert!(log_filter("").is_err());
    }

    #[test]
    fn the_marker_is_one_word_without_dots() {
        assert_eq!(marker("SUB_"), Ok("SUB_".to_string()));
        assert!(marker("").is_err());
        assert!(marker("A.B").is_err());
        assert!(marker("SUB ").is_err());
    }
}

//! URI mapping between SUB_ registrations, the topics they stand for, and the
//! procedures events are forwarded to. Pure string functions; calls nothing but
//! `std` and `regex`.
//!
//! The convention: a registration whose *last* URI component starts with the
//! marker (default `SUB_`) asks for the events of the topic with the marker
//! removed from that component, `com.example.SUB_status` → `com.example.status`.
//! Forwarding goes the other way: an event's concrete topic gets the marker put
//! back on its last component to name the procedure to call.
//!
//! Consumer groups: the last component may end in a group after the group
//! separator (default `__`): `com.example.SUB_status__audit` is the group
//! `audit` of the topic `com.example.status`, and `com.example.SUB_status` its
//! default group. Each group gets every event once. The group is what follows
//! the *last* separator, when both it and what precedes it are non-empty
//! (`SUB_a__b__c` is the group `c` of the topic `a__b`; `SUB_status__` has no
//! group: its topic is `status__`).

use std::fmt;
use std::str::FromStr;

use regex::Regex;

/// How a registration or subscription URI is matched by the router
/// (the WAMP `match` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchPolicy {
    Exact,
    Prefix,
    Wildcard,
}

impl MatchPolicy {
    /// The wire name, as in the `match` option and the meta API payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchPolicy::Exact => "exact",
            MatchPolicy::Prefix => "prefix",
            MatchPolicy::Wildcard => "wildcard",
        }
    }
}

impl fmt::Display for MatchPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `match` value that is none of `exact`, `prefix`, `wildcard`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown match policy {0:?} (expected exact, prefix or wildcard)")]
pub struct UnknownMatchPolicy(pub String);

impl FromStr for MatchPolicy {
    type Err = UnknownMatchPolicy;

    fn from_str(s: &str) -> Result<MatchPolicy, UnknownMatchPolicy> {
        match s {
            "exact" => Ok(MatchPolicy::Exact),
            "prefix" => Ok(MatchPolicy::Prefix),
            "wildcard" => Ok(MatchPolicy::Wildcard),
            other => Err(UnknownMatchPolicy(other.to_owned())),
        }
    }
}

/// Why a marker was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    #[error("the SUB_ marker must not be empty")]
    Empty,
    /// The marker is matched against one URI component, which never holds a
    /// dot, so such a marker would silently match nothing.
    #[error("the SUB_ marker {0:?} must not contain '.'")]
    ContainsDot(String),
    #[error("the group separator must not be empty")]
    EmptySeparator,
    #[error("the group separator {0:?} must not contain '.'")]
    SeparatorContainsDot(String),
    #[error("the batch marker {0:?} must not be empty, contain '.' or start the SUB_ marker")]
    BadBatchMarker(String),
}

/// A consumer group of a topic: its name (`None` is the default group, no
/// suffix) and whether it is served in batches (its registrations carry the
/// batch marker). `SUB_status` and `SUBBATCH_status` are two groups: each
/// gets every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    pub name: Option<String>,
    pub batch: bool,
}

impl Group {
    /// The group `name`, one call per event.
    pub fn named(name: &str) -> Group {
        Group {
            name: Some(name.to_owned()),
            batch: false,
        }
    }

    /// The same group served in batches.
    pub fn batched(self) -> Group {
        Group {
            batch: true,
            ..self
        }
    }
}

/// The prefix that marks a registration's last URI component as a shared
/// subscription, `SUB_` unless configured otherwise, and the separator of a
/// consumer group's name at its end, `__` unless configured otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    marker: String,
    separator: String,
    /// The prefix of a batch registration's last component.
    batch: String,
}

impl Marker {
    pub const DEFAULT: &'static str = "SUB_";
    pub const DEFAULT_SEPARATOR: &'static str = "__";
    pub const DEFAULT_BATCH: &'static str = "SUBBATCH_";

    pub fn new(marker: impl Into<String>) -> Result<Marker, MarkerError> {
        let marker = marker.into();
        if marker.is_empty() {
            Err(MarkerError::Empty)
        } else if marker.contains('.') {
            Err(MarkerError::ContainsDot(marker))
        } else {
            Ok(Marker {
                marker,
                separator: Marker::DEFAULT_SEPARATOR.to_owned(),
                batch: Marker::DEFAULT_BATCH.to_owned(),
            })
        }
    }

    /// The same marker with another group separator.
    pub fn with_separator(self, separator: impl Into<String>) -> Result<Marker, MarkerError> {
        let separator = separator.into();
        if separator.is_empty() {
            Err(MarkerError::EmptySeparator)
        } else if separator.contains('.') {
            Err(MarkerError::SeparatorContainsDot(separator))
        } else {
            Ok(Marker { separator, ..self })
        }
    }

    /// The same marker with another batch marker. It must not be a prefix
    /// of the marker (`SUB_x` would read as a batch registration).
    pub fn with_batch_marker(self, batch: impl Into<String>) -> Result<Marker, MarkerError> {
        let batch = batch.into();
        if batch.is_empty() || batch.contains('.') || self.marker.starts_with(&batch) {
            Err(MarkerError::BadBatchMarker(batch))
        } else {
            Ok(Marker { batch, ..self })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.marker
    }

    pub fn batch_marker(&self) -> &str {
        &self.batch
    }

    /// Whether `procedure` is a batch registration's (its last component
    /// starts with the batch marker), without parsing it whole.
    pub fn is_batch(&self, procedure: &str) -> bool {
        split_last(procedure).1.starts_with(self.batch.as_str())
    }

    pub fn separator(&self) -> &str {
        &self.separator
    }

    /// The topic a registration URI stands for, or `None` when the URI is not
    /// a SUB_ registration: its last component must start with the marker and
    /// have at least one character after it.
    ///
    /// `com.example.SUB_status` → `com.example.status`, and for a wildcard
    /// pattern `com..SUB_status` → `com..status`. A marker in an earlier
    /// component does not count (`com.SUB_x.status` is an ordinary procedure).
    ///
    /// The group suffix, if any, is not part of the topic
    /// (`com.example.SUB_status__audit` → `com.example.status`).
    pub fn topic_for(&self, registration_uri: &str) -> Option<String> {
        self.parse(registration_uri).map(|(topic, _)| topic)
    }

    /// The topic a registration URI stands for and the group it reads in.
    pub fn parse(&self, registration_uri: &str) -> Option<(String, Group)> {
        let (head, last) = split_last(registration_uri);
        // The batch marker first: the SUB_ marker may be a prefix of it.
        let (rest, batch) = match last.strip_prefix(self.batch.as_str()) {
            Some(rest) => (rest, true),
            None => (last.strip_prefix(self.marker.as_str())?, false),
        };
        if rest.is_empty() {
            return None;
        }
        let (rest, name) = match rest.rsplit_once(self.separator.as_str()) {
            Some((name, group)) if !name.is_empty() && !group.is_empty() => {
                (name, Some(group.to_owned()))
            }
            _ => (rest, None),
        };
        let group = Group { name, batch };
        let mut topic = String::with_capacity(registration_uri.len());
        if let Some(head) = head {
            topic.push_str(head);
            topic.push('.');
        }
        topic.push_str(rest);
        Some((topic, group))
    }

    /// The procedure an event on the concrete `topic` is forwarded to for
    /// `group`: the marker (or batch marker) put back on the last component,
    /// and the group's suffix after it, `com.x.status` → `com.x.SUB_status`
    /// (default group), `com.x.SUB_status__audit` or
    /// `com.x.SUBBATCH_status`. The inverse of [`Marker::parse`].
    pub fn procedure_for(&self, topic: &str, group: &Group) -> String {
        let (head, last) = split_last(topic);
        let marker = if group.batch {
            &self.batch
        } else {
            &self.marker
        };
        let name = group.name.as_deref();
        let mut procedure = String::with_capacity(
            topic.len() + marker.len() + name.map_or(0, |g| g.len() + self.separator.len()),
        );
        if let Some(head) = head {
            procedure.push_str(head);
            procedure.push('.');
        }
        procedure.push_str(marker);
        procedure.push_str(last);
        if let Some(name) = name {
            procedure.push_str(&self.separator);
            procedure.push_str(name);
        }
        procedure
    }
}

impl Default for Marker {
    fn default() -> Marker {
        Marker::new(Marker::DEFAULT).expect("a valid marker")
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.marker)
    }
}

/// `("a.b", "c")` for `a.b.c`; `(None, "c")` for a URI without dots.
fn split_last(uri: &str) -> (Option<&str>, &str) {
    match uri.rsplit_once('.') {
        Some((head, last)) => (Some(head), last),
        None => (None, uri),
    }
}

/// A subscription we want on the router. Exact and wildcard subscriptions to
/// the same string are different subscriptions, hence the policy in the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicKey {
    pub topic: String,
    pub policy: MatchPolicy,
}

impl fmt::Display for TopicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.policy {
            MatchPolicy::Exact => f.write_str(&self.topic),
            policy => write!(f, "{} ({policy})", self.topic),
        }
    }
}

/// What a registration means to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// A SUB_ registration: subscribe to this topic, for this group.
    Shared(TopicKey, Group),
    /// Not a SUB_ registration; ignored silently (most procedures are these).
    Ordinary,
    /// A SUB_-looking URI that the include filter rejects.
    FilteredOut,
    /// A SUB_-looking prefix registration. A prefix registration covers many
    /// procedures, so there is no one topic it stands for: warn and ignore.
    Prefix,
}

/// Decides which registrations are SUB_ registrations: the marker plus the
/// optional include filter.
#[derive(Debug, Clone)]
pub struct Mapper {
    marker: Marker,
    filter: Option<Regex>,
}

impl Mapper {
    /// `filter`, when set, must match (anywhere, as [`Regex::is_match`]; anchor
    /// it with `^…$` for a full match) the full registration URI.
    pub fn new(marker: Marker, filter: Option<Regex>) -> Mapper {
        Mapper { marker, filter }
    }

    pub fn marker(&self) -> &Marker {
        &self.marker
    }

    pub fn classify(&self, uri: &str, policy: MatchPolicy) -> Classification {
        let Some((topic, group)) = self.marker.parse(uri) else {
            return Classification::Ordinary;
        };
        // The filter comes before the prefix check: a registration the
        // operator excluded is not worth a warning.
        if self.filter.as_ref().is_some_and(|f| !f.is_match(uri)) {
            return Classification::FilteredOut;
        }
        match policy {
            MatchPolicy::Prefix => Classification::Prefix,
            policy => Classification::Shared(TopicKey { topic, policy }, group),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub() -> Marker {
        Marker::default()
    }

    #[test]
    fn match_policy_parses_the_three_wire_names_and_nothing_else() {
        for p in [
            MatchPolicy::Exact,
            MatchPolicy::Prefix,
            MatchPolicy::Wildcard,
        ] {
            assert_eq!(p.as_str().parse::<MatchPolicy>(), Ok(p));
        }
        assert_eq!(
            "Exact".parse::<MatchPolicy>(),
            Err(UnknownMatchPolicy("Exact".into()))
        );
        assert!("".parse::<MatchPolicy>().is_err());
    }

    #[test]
    fn marker_must_be_non_empty_and_dot_free() {
        assert_eq!(Marker::new(""), Err(MarkerError::Empty));
        assert_eq!(
            Marker::new("x.SUB_"),
            Err(MarkerError::ContainsDot("x.SUB_".into()))
        );
        assert_eq!(Marker::new("Q_").map(|m| m.to_string()), Ok("Q_".into()));
        assert_eq!(sub().as_str(), "SUB_");
    }

    #[test]
    fn sub_registration_maps_to_the_topic_without_the_marker() {
        assert_eq!(
            sub().topic_for("com.example.SUB_status").as_deref(),
            Some("com.example.status")
        );
    }

    #[test]
    fn wildcard_registration_keeps_its_empty_components() {
        assert_eq!(
            sub().topic_for("com..SUB_status").as_deref(),
            Some("com..status")
        );
        assert_eq!(sub().topic_for("..SUB_x").as_deref(), Some("..x"));
    }

    #[test]
    fn marker_alone_or_missing_is_not_a_sub_registration() {
        for uri in [
            "SUB_",
            "com.example.SUB_",
            "com.example.status",
            "com.example.",
            "com.example.SUB_status.",
            "",
            ".",
            "com.example.sub_status",
            "com.example.XSUB_status",
        ] {
            assert_eq!(sub().topic_for(uri), None, "{uri:?}");
        }
    }

    #[test]
    fn marker_in_an_earlier_component_only_does_not_count() {
        assert_eq!(sub().topic_for("com.SUB_x.status"), None);
        assert_eq!(sub().topic_for("SUB_a.b"), None);
    }

    #[test]
    fn uri_without_dots_is_its_own_last_component() {
        assert_eq!(sub().topic_for("SUB_status").as_deref(), Some("status"));
        assert_eq!(
            sub().procedure_for("status", &Group::default()),
            "SUB_status"
        );
    }

    #[test]
    fn marker_is_stripped_once() {
        assert_eq!(sub().topic_for("a.SUB_SUB_x").as_deref(), Some("a.SUB_x"));
        assert_eq!(
            sub().procedure_for("a.SUB_x", &Group::default()),
            "a.SUB_SUB_x"
        );
    }

    #[test]
    fn non_ascii_uris_and_markers_map_on_character_boundaries() {
        assert_eq!(
            sub().topic_for("com.größe.SUB_änderung").as_deref(),
            Some("com.größe.änderung")
        );
        assert_eq!(
            sub().procedure_for("com.größe.änderung", &Group::default()),
            "com.größe.SUB_änderung"
        );
        let m = Marker::new("ü_").unwrap();
        assert_eq!(m.topic_for("a.ü_ß").as_deref(), Some("a.ß"));
        assert_eq!(m.topic_for("a.ü_"), None);
        assert_eq!(m.procedure_for("a.ß", &Group::default()), "a.ü_ß");
    }

    #[test]
    fn custom_marker_is_used_both_ways() {
        let m = Marker::new("shared-").unwrap();
        assert_eq!(m.topic_for("a.b.shared-c").as_deref(), Some("a.b.c"));
        assert_eq!(m.topic_for("a.b.SUB_c"), None);
        assert_eq!(m.procedure_for("a.b.c", &Group::default()), "a.b.shared-c");
    }

    #[test]
    fn concrete_topic_maps_back_to_the_procedure() {
        assert_eq!(
            sub().procedure_for("com.x.status", &Group::default()),
            "com.x.SUB_status"
        );
        assert_eq!(
            sub().procedure_for("com.x.", &Group::default()),
            "com.x.SUB_"
        );
    }

    #[test]
    fn mapping_round_trips_for_sub_registrations() {
        for uri in ["com.example.SUB_status", "a..SUB_b", "SUB_x", "é.SUB_ñ"] {
            let topic = sub().topic_for(uri).unwrap();
            assert_eq!(sub().procedure_for(&topic, &Group::default()), uri);
        }
    }

    #[test]
    fn classify_sorts_registrations_by_what_they_mean() {
        let mapper = Mapper::new(sub(), None);
        assert_eq!(
            mapper.classify("com.a.SUB_x", MatchPolicy::Exact),
            Classification::Shared(
                TopicKey {
                    topic: "com.a.x".into(),
                    policy: MatchPolicy::Exact
                },
                Group::default()
            )
        );
        assert_eq!(
            mapper.classify("com..SUB_x", MatchPolicy::Wildcard),
            Classification::Shared(
                TopicKey {
                    topic: "com..x".into(),
                    policy: MatchPolicy::Wildcard
                },
                Group::default()
            )
        );
        assert_eq!(
            mapper.classify("com.a.SUB_x", MatchPolicy::Prefix),
            Classification::Prefix
        );
        assert_eq!(
            mapper.classify("com.a.pfx", MatchPolicy::Prefix),
            Classification::Ordinary
        );
        assert_eq!(
            mapper.classify("com.a.x", MatchPolicy::Exact),
            Classification::Ordinary
        );
    }

    #[test]
    fn filter_rejects_non_matching_uri() {
        let filter = Regex::new(r"^com\.example\.").unwrap();
        let mapper = Mapper::new(sub(), Some(filter));
        assert!(matches!(
            mapper.classify("com.example.SUB_x", MatchPolicy::Exact),
            Classification::Shared(..)
        ));
        assert_eq!(
            mapper.classify("org.other.SUB_x", MatchPolicy::Exact),
            Classification::FilteredOut
        );
        // Excluded prefix registrations are not worth a warning.
        assert_eq!(
            mapper.classify("org.other.SUB_x", MatchPolicy::Prefix),
            Classification::FilteredOut
        );
        assert_eq!(
            mapper.classify("org.other.plain", MatchPolicy::Exact),
            Classification::Ordinary
        );
    }

    #[test]
    fn a_group_suffix_names_the_group_of_the_same_topic() {
        assert_eq!(
            sub().parse("com.example.SUB_status__audit"),
            Some(("com.example.status".into(), Group::named("audit")))
        );
        assert_eq!(
            sub().parse("com.example.SUB_status"),
            Some(("com.example.status".into(), Group::default()))
        );
        assert_eq!(
            sub().parse("com..SUB_status__audit"),
            Some(("com..status".into(), Group::named("audit")))
        );
        // The last separator counts; both sides must be non-empty.
        assert_eq!(
            sub().parse("a.SUB_x__y__z"),
            Some(("a.x__y".into(), Group::named("z")))
        );
        assert_eq!(
            sub().parse("a.SUB_x__"),
            Some(("a.x__".into(), Group::default()))
        );
        assert_eq!(
            sub().parse("a.SUB___g"),
            Some(("a.__g".into(), Group::default()))
        );
        // A separator in an earlier component is part of the topic.
        assert_eq!(
            sub().parse("a__b.SUB_x"),
            Some(("a__b.x".into(), Group::default()))
        );
        assert_eq!(
            sub().procedure_for("com.x.status", &Group::named("audit")),
            "com.x.SUB_status__audit"
        );
        for uri in [
            "com.example.SUB_status__audit",
            "a..SUB_b__g",
            "SUB_x__y__z",
        ] {
            let (topic, group) = sub().parse(uri).unwrap();
            assert_eq!(sub().procedure_for(&topic, &group), uri);
        }
    }

    #[test]
    fn a_custom_separator_is_used_both_ways_and_checked() {
        let m = sub().with_separator("-g-").unwrap();
        assert_eq!(
            m.parse("a.SUB_x-g-audit"),
            Some(("a.x".into(), Group::named("audit")))
        );
        assert_eq!(
            m.parse("a.SUB_x__audit"),
            Some(("a.x__audit".into(), Group::default()))
        );
        assert_eq!(
            m.procedure_for("a.x", &Group::named("audit")),
            "a.SUB_x-g-audit"
        );
        assert_eq!(sub().with_separator(""), Err(MarkerError::EmptySeparator));
        assert_eq!(
            sub().with_separator("a.b"),
            Err(MarkerError::SeparatorContainsDot("a.b".into()))
        );
    }

    #[test]
    fn a_batch_marker_makes_a_group_of_its_own_and_maps_back() {
        let batch = Group::default().batched();
        assert_eq!(
            sub().parse("com.example.SUBBATCH_status"),
            Some(("com.example.status".into(), batch.clone()))
        );
        assert_eq!(
            sub().parse("com.example.SUBBATCH_status__audit"),
            Some(("com.example.status".into(), Group::named("audit").batched()))
        );
        assert_ne!(
            batch,
            Group::default(),
            "SUB_status and SUBBATCH_status differ"
        );
        for uri in [
            "com.example.SUBBATCH_status__audit",
            "a..SUBBATCH_b",
            "SUBBATCH_x",
        ] {
            let (topic, group) = sub().parse(uri).unwrap();
            assert_eq!(sub().procedure_for(&topic, &group), uri);
        }
        assert!(sub().is_batch("com.example.SUBBATCH_status"));
        assert!(!sub().is_batch("com.example.SUB_status"));
        assert!(!sub().is_batch("com.SUBBATCH_x.status"));
        // A marker that is a prefix of the batch marker still works: the
        // batch marker is tried first.
        let m = Marker::new("SUB").unwrap();
        assert_eq!(m.parse("a.SUBBATCH_x").map(|(_, g)| g.batch), Some(true));
        assert_eq!(m.parse("a.SUBx").map(|(_, g)| g.batch), Some(false));
        // A batch marker that starts the marker would swallow it.
        assert!(sub().with_batch_marker("SU").is_err());
        assert!(sub().with_batch_marker("a.b").is_err());
        assert!(sub().with_batch_marker("").is_err());
    }

    #[test]
    fn classify_gives_the_group() {
        let mapper = Mapper::new(sub(), None);
        assert_eq!(
            mapper.classify("com.a.SUB_x__audit", MatchPolicy::Exact),
            Classification::Shared(
                TopicKey {
                    topic: "com.a.x".into(),
                    policy: MatchPolicy::Exact
                },
                Group::named("audit")
            )
        );
    }

    #[test]
    fn topic_keys_with_the_same_string_but_different_policies_differ() {
        let exact = TopicKey {
            topic: "a.b".into(),
            policy: MatchPolicy::Exact,
        };
        let wild = TopicKey {
            topic: "a.b".into(),
            policy: MatchPolicy::Wildcard,
        };
        assert_ne!(exact, wild);
        assert_eq!(exact.to_string(), "a.b");
        assert_eq!(wild.to_string(), "a.b (wildcard)");
    }
}

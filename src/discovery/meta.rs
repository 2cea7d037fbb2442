//! Parsing of the dealer's registration meta API: the `wamp.registration.on_*`
//! meta events and the results of `wamp.registration.list` / `get`, from
//! already-decoded positional arguments. Pure; calls only `crate::wamp` data
//! types and [`super::topic::MatchPolicy`].
//!
//! Payload shapes are those captured from Crossbar 26.10.1 (see
//! `shared/reference/crossbar-26.10.1.md`, section 5). Unknown extra keys are
//! ignored everywhere; missing or mistyped fields are errors, never panics.

use crate::wamp::{Dict, RegistrationId, SessionId, Value};

use super::topic::{MatchPolicy, UnknownMatchPolicy};

/// Meta topic: a registration was created (its first callee registered).
pub const ON_CREATE: &str = "wamp.registration.on_create";
/// Meta topic: a callee was added to a registration.
pub const ON_REGISTER: &str = "wamp.registration.on_register";
/// Meta topic: a callee left a registration.
pub const ON_UNREGISTER: &str = "wamp.registration.on_unregister";
/// Meta topic: a registration's last callee left, so it is gone.
pub const ON_DELETE: &str = "wamp.registration.on_delete";
/// The meta topics to subscribe to, all of them before calling [`LIST`].
pub const META_TOPICS: [&str; 4] = [ON_CREATE, ON_REGISTER, ON_UNREGISTER, ON_DELETE];

/// Meta procedure: the ids of all registrations, by match policy.
pub const LIST: &str = "wamp.registration.list";
/// Meta procedure: one registration's details, by id.
pub const GET: &str = "wamp.registration.get";
/// Meta procedure: how many callees a registration has, by id (for
/// `/status`; a refusal only leaves the count unknown).
pub const COUNT_CALLEES: &str = "wamp.registration.count_callees";
/// The error `get` answers with for an id that no longer exists (pitfall P11:
/// a normal outcome when a registration is deleted while we ask about it).
pub const NO_SUCH_REGISTRATION: &str = "wamp.error.no_such_registration";

/// What the router says about one registration (`on_create`, `get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationInfo {
    pub id: RegistrationId,
    pub uri: String,
    pub match_policy: MatchPolicy,
    /// The shared-registration invocation policy (`single`, `roundrobin`,
    /// `random`, `first`, `last`); informational, for logs.
    pub invoke: String,
}

/// One registration meta event, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEvent {
    /// `on_create`: sent only for a registration's first callee (P10).
    Created {
        session: Option<SessionId>,
        info: RegistrationInfo,
    },
    /// `on_register`: every callee, including further callees of a shared
    /// registration, which get no `on_create`.
    Registered {
        session: Option<SessionId>,
        registration: RegistrationId,
    },
    /// `on_unregister`: a callee left; the registration may live on.
    Unregistered {
        session: Option<SessionId>,
        registration: RegistrationId,
    },
    /// `on_delete`: the last callee left; the registration is gone.
    Deleted {
        session: Option<SessionId>,
        registration: RegistrationId,
    },
}

/// The result of `wamp.registration.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationList {
    pub exact: Vec<RegistrationId>,
    pub prefix: Vec<RegistrationId>,
    pub wildcard: Vec<RegistrationId>,
}

impl RegistrationList {
    /// Every listed id with its match policy.
    pub fn iter(&self) -> impl Iterator<Item = (RegistrationId, MatchPolicy)> + '_ {
        fn tag(
            ids: &[RegistrationId],
            policy: MatchPolicy,
        ) -> impl Iterator<Item = (RegistrationId, MatchPolicy)> + '_ {
            ids.iter().map(move |id| (*id, policy))
        }
        tag(&self.exact, MatchPolicy::Exact)
            .chain(tag(&self.prefix, MatchPolicy::Prefix))
            .chain(tag(&self.wildcard, MatchPolicy::Wildcard))
    }

    /// Every listed id.
    pub fn ids(&self) -> impl Iterator<Item = RegistrationId> + '_ {
        self.iter().map(|(id, _)| id)
    }
}

/// A meta payload that does not have the expected shape. The caller drops the
/// message and counts it; nothing here is worth a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("not a registration meta topic: {0:?}")]
    UnknownTopic(String),
    #[error("missing argument {index} ({what})")]
    MissingArgument { index: usize, what: &'static str },
    #[error("missing key {key:?} in {what}")]
    MissingKey {
        what: &'static str,
        key: &'static str,
    },
    #[error("{what}: expected {expected}, got {got}")]
    WrongType {
        what: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    UnknownMatchPolicy(#[from] UnknownMatchPolicy),
}

/// Parses the arguments of an event on one of [`META_TOPICS`].
pub fn parse_meta_event(topic: &str, args: &[Value]) -> Result<MetaEvent, MetaError> {
    match topic {
        ON_CREATE => {
            let (session, info) = parse_on_create(args)?;
            Ok(MetaEvent::Created { session, info })
        }
        ON_REGISTER => {
            let (session, registration) = parse_registration_event(args)?;
            Ok(MetaEvent::Registered {
                session,
                registration,
            })
        }
        ON_UNREGISTER => {
            let (session, registration) = parse_registration_event(args)?;
            Ok(MetaEvent::Unregistered {
                session,
                registration,
            })
        }
        ON_DELETE => {
            let (session, registration) = parse_registration_event(args)?;
            Ok(MetaEvent::Deleted {
                session,
                registration,
            })
        }
        other => Err(MetaError::UnknownTopic(other.to_owned())),
    }
}

/// `on_create`: `[session_id, {"id", "created", "uri", "match", "invoke"}]`.
pub fn parse_on_create(args: &[Value]) -> Result<(Option<SessionId>, RegistrationInfo), MetaError> {
    let session = parse_session(arg(args, 0, "session id")?)?;
    let info = parse_info(arg(args, 1, "registration details")?)?;
    Ok((session, info))
}

/// `on_register`, `on_unregister`, `on_delete`: `[session_id_or_null,
/// registration_id]`. The session id is `null` when the removal came from the
/// callee's session ending rather than an UNREGISTER (pitfall P9).
pub fn parse_registration_event(
    args: &[Value],
) -> Result<(Option<SessionId>, RegistrationId), MetaError> {
    let session = parse_session(arg(args, 0, "session id")?)?;
    let id = id(arg(args, 1, "registration id")?, "registration id")?;
    Ok((session, RegistrationId(id)))
}

/// `list` result: `[{"exact": [ids], "prefix": [ids], "wildcard": [ids]}]`.
/// A missing policy key counts as an empty list: only Crossbar is known to
/// send all three, and a missing list cannot hide a registration we need.
pub fn parse_list_result(args: &[Value]) -> Result<RegistrationList, MetaError> {
    let dict = dict(arg(args, 0, "registration list")?, "registration list")?;
    let ids = |key: &'static str| -> Result<Vec<RegistrationId>, MetaError> {
        let Some(value) = dict.get(key) else {
            return Ok(Vec::new());
        };
        let list = value.as_list().ok_or(MetaError::WrongType {
            what: "registration list entry",
            expected: "a list",
            got: value.kind(),
        })?;
        list.iter()
            .map(|v| id(v, "registration id").map(RegistrationId))
            .collect()
    };
    Ok(RegistrationList {
        exact: ids("exact")?,
        prefix: ids("prefix")?,
        wildcard: ids("wildcard")?,
    })
}

/// `get` result: `[{"id", "created", "uri", "match", "invoke"}]`.
pub fn parse_get_result(args: &[Value]) -> Result<RegistrationInfo, MetaError> {
    parse_info(arg(args, 0, "registration details")?)
}

fn arg<'a>(args: &'a [Value], index: usize, what: &'static str) -> Result<&'a Value, MetaError> {
    args.get(index)
        .ok_or(MetaError::MissingArgument { index, what })
}

fn parse_session(value: &Value) -> Result<Option<SessionId>, MetaError> {
    if value.is_null() {
        return Ok(None);
    }
    id(value, "session id").map(|id| Some(SessionId(id)))
}

fn id(value: &Value, what: &'static str) -> Result<u64, MetaError> {
    value.as_u64().ok_or(MetaError::WrongType {
        what,
        expected: "a non-negative integer",
        got: value.kind(),
    })
}

fn dict<'a>(value: &'a Value, what: &'static str) -> Result<&'a Dict, MetaError> {
    value.as_dict().ok_or(MetaError::WrongType {
        what,
        expected: "a dict",
        got: value.kind(),
    })
}

fn parse_info(value: &Value) -> Result<RegistrationInfo, MetaError> {
    const WHAT: &str = "registration details";
    let d = dict(value, WHAT)?;
    let field = |key: &'static str| d.get(key).ok_or(MetaError::MissingKey { what: WHAT, key });
    let string = |key: &'static str| -> Result<&str, MetaError> {
        let v = field(key)?;
        v.as_str().ok_or(MetaError::WrongType {
            what: key,
            expected: "a string",
            got: v.kind(),
        })
    };
    let id = id(field("id")?, "id")?;
    let uri = string("uri")?.to_owned();
    let match_policy = string("match")?.parse()?;
    // `invoke` only feeds log lines, so a router that leaves it out does not
    // cost us the registration; WAMP's default policy is `single`.
    let invoke = match d.get("invoke") {
        None => "single".to_owned(),
        Some(_) => string("invoke")?.to_owned(),
    };
    Ok(RegistrationInfo {
        id: RegistrationId(id),
        uri,
        match_policy,
        invoke,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registration details exactly as Crossbar 26.10.1 sends them.
    fn crossbar_details() -> Value {
        Dict::new()
            .with("id", 5659918306734593u64)
            .with("created", "2026-11-22T10:38:45.571Z")
            .with("uri", "com.example.SUB_status")
            .with("match", "exact")
            .with("invoke", "roundrobin")
            .into()
    }

    fn status_info() -> RegistrationInfo {
        RegistrationInfo {
            id: RegistrationId(5659918306734593),
            uri: "com.example.SUB_status".into(),
            match_policy: MatchPolicy::Exact,
            invoke: "roundrobin".into(),
        }
    }

    #[test]
    fn on_create_payload_from_crossbar_parses() {
        let args = [Value::UInt(3204784108286282), crossbar_details()];
        assert_eq!(
            parse_on_create(&args),
            Ok((Some(SessionId(3204784108286282)), status_info()))
        );
        assert_eq!(
            parse_meta_event(ON_CREATE, &args),
            Ok(MetaEvent::Created {
                session: Some(SessionId(3204784108286282)),
                info: status_info()
            })
        );
    }

    #[test]
    fn prefix_and_wildcard_details_parse_their_policy() {
        let prefix = Dict::new()
            .with("id", 564764882715200u64)
            .with("created", "…")
            .with("uri", "com.example.pfx")
            .with("match", "prefix")
            .with("invoke", "roundrobin");
        let info = parse_get_result(&[prefix.into()]).unwrap();
        assert_eq!(info.match_policy, MatchPolicy::Prefix);
        let wild = Dict::new()
            .with("id", 1u64)
            .with("uri", "com.example..SUB_wild")
            .with("match", "wildcard")
            .with("invoke", "single");
        let info = parse_get_result(&[wild.into()]).unwrap();
        assert_eq!(info.match_policy, MatchPolicy::Wildcard);
        assert_eq!(info.uri, "com.example..SUB_wild");
    }

    #[test]
    fn registration_events_carry_a_session_or_null() {
        let live = [Value::UInt(5680260737682466), Value::UInt(5659918306734593)];
        let gone = [Value::Null, Value::UInt(5659918306734593)];
        assert_eq!(
            parse_meta_event(ON_REGISTER, &live),
            Ok(MetaEvent::Registered {
                session: Some(SessionId(5680260737682466)),
                registration: RegistrationId(5659918306734593)
            })
        );
        assert_eq!(
            parse_meta_event(ON_UNREGISTER, &gone),
            Ok(MetaEvent::Unregistered {
                session: None,
                registration: RegistrationId(5659918306734593)
            })
        );
        assert_eq!(
            parse_meta_event(ON_DELETE, &gone),
            Ok(MetaEvent::Deleted {
                session: None,
                registration: RegistrationId(5659918306734593)
            })
        );
    }

    #[test]
    fn list_result_from_crossbar_parses_with_policies() {
        let args = [Dict::new()
            .with(
                "exact",
                vec![Value::UInt(7277054764172009), Value::UInt(8538361499252176)],
            )
            .with("prefix", vec![Value::UInt(4698877818544702)])
            .with("wildcard", vec![Value::UInt(7742608050615842)])
            .into()];
        let list = parse_list_result(&args).unwrap();
        let all: Vec<_> = list.iter().collect();
        assert_eq!(
            all,
            [
                (RegistrationId(7277054764172009), MatchPolicy::Exact),
                (RegistrationId(8538361499252176), MatchPolicy::Exact),
                (RegistrationId(4698877818544702), MatchPolicy::Prefix),
                (RegistrationId(7742608050615842), MatchPolicy::Wildcard),
            ]
        );
        assert_eq!(list.ids().count(), 4);
    }

    #[test]
    fn empty_list_result_parses_to_no_ids() {
        let empty: Value = Dict::new()
            .with("exact", Vec::<Value>::new())
            .with("prefix", Vec::<Value>::new())
            .with("wildcard", Vec::<Value>::new())
            .into();
        assert_eq!(parse_list_result(&[empty]), Ok(RegistrationList::default()));
        assert_eq!(
            parse_list_result(&[Dict::new().into()]),
            Ok(RegistrationList::default())
        );
    }

    #[test]
    fn get_result_from_crossbar_parses() {
        assert_eq!(parse_get_result(&[crossbar_details()]), Ok(status_info()));
    }

    #[test]
    fn extra_keys_and_extra_arguments_are_tolerated() {
        let Value::Dict(mut d) = crossbar_details() else {
            unreachable!()
        };
        d.insert("x_future", Value::List(vec![Value::Null]));
        let args = [Value::UInt(1), d.into(), Value::from("extra")];
        assert_eq!(parse_on_create(&args).map(|(_, i)| i), Ok(status_info()));
        let list = Dict::new()
            .with("exact", vec![Value::UInt(1)])
            .with("regex", vec![Value::UInt(2)]);
        assert_eq!(
            parse_list_result(&[list.into()]).map(|l| l.ids().collect::<Vec<_>>()),
            Ok(vec![RegistrationId(1)])
        );
    }

    #[test]
    fn missing_invoke_defaults_to_single() {
        let Value::Dict(mut d) = crossbar_details() else {
            unreachable!()
        };
        d.remove("invoke");
        assert_eq!(parse_get_result(&[d.into()]).unwrap().invoke, "single");
    }

    #[test]
    fn malformed_meta_args_are_errors_not_panics() {
        let details = crossbar_details();
        let without = |key: &str| {
            let Value::Dict(mut d) = crossbar_details() else {
                unreachable!()
            };
            d.remove(key);
            Value::Dict(d)
        };
        let with = |key: &str, v: Value| {
            let Value::Dict(mut d) = crossbar_details() else {
                unreachable!()
            };
            d.insert(key, v);
            Value::Dict(d)
        };
        // on_create
        assert_eq!(
            parse_on_create(&[]),
            Err(MetaError::MissingArgument {
                index: 0,
                what: "session id"
            })
        );
        assert!(matches!(
            parse_on_create(&[Value::UInt(1)]),
            Err(MetaError::MissingArgument { index: 1, .. })
        ));
        assert!(matches!(
            parse_on_create(&[Value::from("s"), details.clone()]),
            Err(MetaError::WrongType { .. })
        ));
        assert!(matches!(
            parse_on_create(&[Value::Int(-1), details.clone()]),
            Err(MetaError::WrongType { .. })
        ));
        assert!(matches!(
            parse_on_create(&[Value::UInt(1), Value::List(vec![])]),
            Err(MetaError::WrongType { .. })
        ));
        for key in ["id", "uri", "match"] {
            assert_eq!(
                parse_on_create(&[Value::UInt(1), without(key)]),
                Err(MetaError::MissingKey {
                    what: "registration details",
                    key
                })
            );
        }
        assert!(matches!(
            parse_get_result(&[with("id", Value::Float(1.0))]),
            Err(MetaError::WrongType { what: "id", .. })
        ));
        assert!(matches!(
            parse_get_result(&[with("uri", Value::Bytes(b"x".to_vec()))]),
            Err(MetaError::WrongType { what: "uri", .. })
        ));
        assert!(matches!(
            parse_get_result(&[with("invoke", Value::Null)]),
            Err(MetaError::WrongType { what: "invoke", .. })
        ));
        assert_eq!(
            parse_get_result(&[with("match", "regex".into())]),
            Err(MetaError::UnknownMatchPolicy(UnknownMatchPolicy(
                "regex".into()
            )))
        );
        // on_register & co.
        assert!(parse_registration_event(&[Value::Null]).is_err());
        assert!(parse_registration_event(&[Value::Null, Value::Null]).is_err());
        assert!(parse_registration_event(&[Value::Null, Value::Int(-5)]).is_err());
        assert!(parse_registration_event(&[Value::Bool(true), Value::UInt(5)]).is_err());
        assert_eq!(
            parse_meta_event("wamp.subscription.on_create", &[]),
            Err(MetaError::UnknownTopic(
                "wamp.subscription.on_create".into()
            ))
        );
        // list
        assert!(parse_list_result(&[]).is_err());
        assert!(parse_list_result(&[Value::List(vec![])]).is_err());
        assert!(parse_list_result(&[Dict::new().with("exact", 5u64).into()]).is_err());
        assert!(
            parse_list_result(&[Dict::new().with("exact", vec![Value::from("x")]).into()]).is_err()
        );
        // get
        assert!(parse_get_result(&[]).is_err());
        assert!(parse_get_result(&[Value::Null]).is_err());
    }

    #[test]
    fn errors_read_as_sentences() {
        let e = parse_get_result(&[Value::Null]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "registration details: expected a dict, got null"
        );
        let e = parse_registration_event(&[Value::Null]).unwrap_err();
        assert_eq!(e.to_string(), "missing argument 1 (registration id)");
    }
}

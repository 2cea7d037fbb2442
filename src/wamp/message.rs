//! WAMP v2 messages: one variant per message type the sidecar and its test
//! peers use, with the spec's field names. Converts between a message and the
//! list of values it is on the wire; knows nothing of bytes (see `codec`).

use super::id::{PublicationId, RegistrationId, RequestId, SessionId, SubscriptionId};
use super::value::{Dict, Value};

/// Message type codes from the WAMP spec.
pub mod code {
    pub const HELLO: u64 = 1;
    pub const WELCOME: u64 = 2;
    pub const ABORT: u64 = 3;
    pub const CHALLENGE: u64 = 4;
    pub const AUTHENTICATE: u64 = 5;
    pub const GOODBYE: u64 = 6;
    pub const ERROR: u64 = 8;
    pub const PUBLISH: u64 = 16;
    pub const PUBLISHED: u64 = 17;
    pub const SUBSCRIBE: u64 = 32;
    pub const SUBSCRIBED: u64 = 33;
    pub const UNSUBSCRIBE: u64 = 34;
    pub const UNSUBSCRIBED: u64 = 35;
    pub const EVENT: u64 = 36;
    pub const CALL: u64 = 48;
    pub const CANCEL: u64 = 49;
    pub const RESULT: u64 = 50;
    pub const REGISTER: u64 = 64;
    pub const REGISTERED: u64 = 65;
    pub const UNREGISTER: u64 = 66;
    pub const UNREGISTERED: u64 = 67;
    pub const INVOCATION: u64 = 68;
    pub const INTERRUPT: u64 = 69;
    pub const YIELD: u64 = 70;
}

/// Positional Arguments and keyword ArgumentsKw of a PUBLISH, EVENT, CALL,
/// RESULT, INVOCATION, YIELD or ERROR. Absent on the wire reads as empty;
/// trailing empty parts are omitted on encode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub args: Vec<Value>,
    pub kwargs: Dict,
}

impl Payload {
    pub fn new(args: Vec<Value>, kwargs: Dict) -> Payload {
        Payload { args, kwargs }
    }

    pub fn is_empty(&self) -> bool {
        self.args.is_empty() && self.kwargs.is_empty()
    }
}

/// An EVENT: a publication delivered to one of our subscriptions.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub subscription: SubscriptionId,
    pub publication: PublicationId,
    /// Crossbar puts `topic` here only for pattern-based subscriptions, and
    /// `publisher`/`publisher_authid`/`publisher_authrole` when disclosed.
    pub details: Dict,
    pub payload: Payload,
}

/// An INVOCATION: a call routed to one of our registrations (test peers).
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub request: RequestId,
    pub registration: RegistrationId,
    pub details: Dict,
    pub payload: Payload,
}

/// Every WAMP message we send or receive.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello {
        realm: String,
        details: Dict,
    },
    Welcome {
        session: SessionId,
        details: Dict,
    },
    Abort {
        details: Dict,
        reason: String,
    },
    Challenge {
        authmethod: String,
        extra: Dict,
    },
    Authenticate {
        signature: String,
        extra: Dict,
    },
    Goodbye {
        details: Dict,
        reason: String,
    },
    Error {
        request_type: u64,
        request: RequestId,
        details: Dict,
        error: String,
        payload: Payload,
    },
    Publish {
        request: RequestId,
        options: Dict,
        topic: String,
        payload: Payload,
    },
    Published {
        request: RequestId,
        publication: PublicationId,
    },
    Subscribe {
        request: RequestId,
        options: Dict,
        topic: String,
    },
    Subscribed {
        request: RequestId,
        subscription: SubscriptionId,
    },
    Unsubscribe {
        request: RequestId,
        subscription: SubscriptionId,
    },
    /// `details` is only present when the router revokes a subscription.
    Unsubscribed {
        request: RequestId,
        details: Dict,
    },
    Event(Event),
    Call {
        request: RequestId,
        options: Dict,
        procedure: String,
        payload: Payload,
    },
    Cancel {
        request: RequestId,
        options: Dict,
    },
    Result {
        request: RequestId,
        details: Dict,
        payload: Payload,
    },
    Register {
        request: RequestId,
        options: Dict,
        procedure: String,
    },
    Registered {
        request: RequestId,
        registration: RegistrationId,
    },
    Unregister {
        request: RequestId,
        registration: RegistrationId,
    },
    /// `details` is only present when the router revokes a registration.
    Unregistered {
        request: RequestId,
        details: Dict,
    },
    Invocation(Invocation),
    Interrupt {
        request: RequestId,
        options: Dict,
    },
    Yield {
        request: RequestId,
        options: Dict,
        payload: Payload,
    },
}

/// Why a list of values is not a valid WAMP message. The decoder's caller
/// treats every variant the same way (close the session as a protocol
/// violation); the detail is for the log line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("a WAMP message must be a non-empty list, got {0}")]
    NotAList(&'static str),
    #[error("unknown WAMP message type {0}")]
    UnknownType(u64),
    #[error("{message} has {got} elements, expected {expected}")]
    Length {
        message: &'static str,
        got: usize,
        expected: &'static str,
    },
    #[error("{message}.{field} must be {expected}, got {got}")]
    Field {
        message: &'static str,
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
}

impl Message {
    /// The spec's name of this message type, for logs and errors.
    pub fn name(&self) -> &'static str {
        name_of(self.code()).unwrap_or("UNKNOWN")
    }

    pub fn code(&self) -> u64 {
        match self {
            Message::Hello { .. } => code::HELLO,
            Message::Welcome { .. } => code::WELCOME,
            Message::Abort { .. } => code::ABORT,
            Message::Challenge { .. } => code::CHALLENGE,
            Message::Authenticate { .. } => code::AUTHENTICATE,
            Message::Goodbye { .. } => code::GOODBYE,
            Message::Error { .. } => code::ERROR,
            Message::Publish { .. } => code::PUBLISH,
            Message::Published { .. } => code::PUBLISHED,
            Message::Subscribe { .. } => code::SUBSCRIBE,
            Message::Subscribed { .. } => code::SUBSCRIBED,
            Message::Unsubscribe { .. } => code::UNSUBSCRIBE,
            Message::Unsubscribed { .. } => code::UNSUBSCRIBED,
            Message::Event(_) => code::EVENT,
            Message::Call { .. } => code::CALL,
            Message::Cancel { .. } => code::CANCEL,
            Message::Result { .. } => code::RESULT,
            Message::Register { .. } => code::REGISTER,
            Message::Registered { .. } => code::REGISTERED,
            Message::Unregister { .. } => code::UNREGISTER,
            Message::Unregistered { .. } => code::UNREGISTERED,
            Message::Invocation(_) => code::INVOCATION,
            Message::Interrupt { .. } => code::INTERRUPT,
            Message::Yield { .. } => code::YIELD,
        }
    }

    /// Parses a decoded wire list. Extra trailing elements beyond what the
    /// spec defines are rejected, except the optional payload parts.
    pub fn from_list(list: Vec<Value>) -> Result<Message, MessageError> {
        let mut p = Fields::new(list)?;
        let msg = match p.code {
            code::HELLO => {
                p.expect_len(3, "3")?;
                Message::Hello {
                    realm: p.string("Realm")?,
                    details: p.dict("Details")?,
                }
            }
            code::WELCOME => {
                p.expect_len(3, "3")?;
                Message::Welcome {
                    session: SessionId(p.id("Session")?),
                    details: p.dict("Details")?,
                }
            }
            code::ABORT => {
                p.expect_len(3, "3")?;
                Message::Abort {
                    details: p.dict("Details")?,
                    reason: p.string("Reason")?,
                }
            }
            code::CHALLENGE => {
                p.expect_len(3, "3")?;
                Message::Challenge {
                    authmethod: p.string("AuthMethod")?,
                    extra: p.dict("Extra")?,
                }
            }
            code::AUTHENTICATE => {
                p.expect_len(3, "3")?;
                Message::Authenticate {
                    signature: p.string("Signature")?,
                    extra: p.dict("Extra")?,
                }
            }
            code::GOODBYE => {
                p.expect_len(3, "3")?;
                Message::Goodbye {
                    details: p.dict("Details")?,
                    reason: p.string("Reason")?,
                }
            }
            code::ERROR => {
                p.expect_len_between(5, 7, "5 to 7")?;
                Message::Error {
                    request_type: p.uint("REQUEST.Type")?,
                    request: RequestId(p.id("REQUEST.Request")?),
                    details: p.dict("Details")?,
                    error: p.string("Error")?,
                    payload: p.payload()?,
                }
            }
            code::PUBLISH => {
                p.expect_len_between(4, 6, "4 to 6")?;
                Message::Publish {
                    request: RequestId(p.id("Request")?),
                    options: p.dict("Options")?,
                    topic: p.string("Topic")?,
                    payload: p.payload()?,
                }
            }
            code::PUBLISHED => {
                p.expect_len(3, "3")?;
                Message::Published {
                    request: RequestId(p.id("PUBLISH.Request")?),
                    publication: PublicationId(p.id("Publication")?),
                }
            }
            code::SUBSCRIBE => {
                p.expect_len(4, "4")?;
                Message::Subscribe {
                    request: RequestId(p.id("Request")?),
                    options: p.dict("Options")?,
                    topic: p.string("Topic")?,
                }
            }
            code::SUBSCRIBED => {
                p.expect_len(3, "3")?;
                Message::Subscribed {
                    request: RequestId(p.id("SUBSCRIBE.Request")?),
                    subscription: SubscriptionId(p.id("Subscription")?),
                }
            }
            code::UNSUBSCRIBE => {
                p.expect_len(3, "3")?;
                Message::Unsubscribe {
                    request: RequestId(p.id("Request")?),
                    subscription: SubscriptionId(p.id("SUBSCRIBED.Subscription")?),
                }
            }
            code::UNSUBSCRIBED => {
                p.expect_len_between(2, 3, "2 or 3")?;
                Message::Unsubscribed {
                    // 0 when the router revokes a subscription on its own.
                    request: RequestId(p.uint("UNSUBSCRIBE.Request")?),
                    details: p.optional_dict("Details")?,
                }
            }
            code::EVENT => {
                p.expect_len_between(4, 6, "4 to 6")?;
                Message::Event(Event {
                    subscription: SubscriptionId(p.id("SUBSCRIBED.Subscription")?),
                    publication: PublicationId(p.id("PUBLISHED.Publication")?),
                    details: p.dict("Details")?,
                    payload: p.payload()?,
                })
            }
            code::CALL => {
                p.expect_len_between(4, 6, "4 to 6")?;
                Message::Call {
                    request: RequestId(p.id("Request")?),
                    options: p.dict("Options")?,
                    procedure: p.string("Procedure")?,
                    payload: p.payload()?,
                }
            }
            code::CANCEL => {
                p.expect_len(3, "3")?;
                Message::Cancel {
                    request: RequestId(p.id("CALL.Request")?),
                    options: p.dict("Options")?,
                }
            }
            code::RESULT => {
                p.expect_len_between(3, 5, "3 to 5")?;
                Message::Result {
                    request: RequestId(p.id("CALL.Request")?),
                    details: p.dict("Details")?,
                    payload: p.payload()?,
                }
            }
            code::REGISTER => {
                p.expect_len(4, "4")?;
                Message::Register {
                    request: RequestId(p.id("Request")?),
                    options: p.dict("Options")?,
                    procedure: p.string("Procedure")?,
                }
            }
            code::REGISTERED => {
                p.expect_len(3, "3")?;
                Message::Registered {
                    request: RequestId(p.id("REGISTER.Request")?),
                    registration: RegistrationId(p.id("Registration")?),
                }
            }
            code::UNREGISTER => {
                p.expect_len(3, "3")?;
                Message::Unregister {
                    request: RequestId(p.id("Request")?),
                    registration: RegistrationId(p.id("REGISTERED.Registration")?),
                }
            }
            code::UNREGISTERED => {
                p.expect_len_between(2, 3, "2 or 3")?;
                Message::Unregistered {
                    // 0 when the router revokes a registration on its own.
                    request: RequestId(p.uint("UNREGISTER.Request")?),
                    details: p.optional_dict("Details")?,
                }
            }
            code::INVOCATION => {
                p.expect_len_between(4, 6, "4 to 6")?;
                Message::Invocation(Invocation {
                    request: RequestId(p.id("Request")?),
                    registration: RegistrationId(p.id("REGISTERED.Registration")?),
                    details: p.dict("Details")?,
                    payload: p.payload()?,
                })
            }
            code::INTERRUPT => {
                p.expect_len(3, "3")?;
                Message::Interrupt {
                    request: RequestId(p.id("INVOCATION.Request")?),
                    options: p.dict("Options")?,
                }
            }
            code::YIELD => {
                p.expect_len_between(3, 5, "3 to 5")?;
                Message::Yield {
                    request: RequestId(p.id("INVOCATION.Request")?),
                    options: p.dict("Options")?,
                    payload: p.payload()?,
                }
            }
            other => return Err(MessageError::UnknownType(other)),
        };
        Ok(msg)
    }

    /// Visits the message's wire elements in order, without copying the
    /// payload; the codec writes them. Trailing empty payload parts are
    /// omitted, as the spec asks.
    pub fn for_each_element<E>(
        &self,
        mut f: impl FnMut(Element<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        use Element as El;
        f(El::UInt(self.code()))?;
        match self {
            Message::Hello { realm, details } => {
                f(El::Str(realm))?;
                f(El::Dict(details))
            }
            Message::Welcome { session, details } => {
                f(El::UInt(session.0))?;
                f(El::Dict(details))
            }
            Message::Abort { details, reason } | Message::Goodbye { details, reason } => {
                f(El::Dict(details))?;
                f(El::Str(reason))
            }
            Message::Challenge { authmethod, extra } => {
                f(El::Str(authmethod))?;
                f(El::Dict(extra))
            }
            Message::Authenticate { signature, extra } => {
                f(El::Str(signature))?;
                f(El::Dict(extra))
            }
            Message::Error {
                request_type,
                request,
                details,
                error,
                payload,
            } => {
                f(El::UInt(*request_type))?;
                f(El::UInt(request.0))?;
                f(El::Dict(details))?;
                f(El::Str(error))?;
                payload_elements(payload, f)
            }
            Message::Publish {
                request,
                options,
                topic,
                payload,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))?;
                f(El::Str(topic))?;
                payload_elements(payload, f)
            }
            Message::Published {
                request,
                publication,
            } => {
                f(El::UInt(request.0))?;
                f(El::UInt(publication.0))
            }
            Message::Subscribe {
                request,
                options,
                topic,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))?;
                f(El::Str(topic))
            }
            Message::Subscribed {
                request,
                subscription,
            } => {
                f(El::UInt(request.0))?;
                f(El::UInt(subscription.0))
            }
            Message::Unsubscribe {
                request,
                subscription,
            } => {
                f(El::UInt(request.0))?;
                f(El::UInt(subscription.0))
            }
            Message::Unsubscribed { request, details }
            | Message::Unregistered { request, details } => {
                f(El::UInt(request.0))?;
                if details.is_empty() {
                    Ok(())
                } else {
                    f(El::Dict(details))
                }
            }
            Message::Event(event) => {
                f(El::UInt(event.subscription.0))?;
                f(El::UInt(event.publication.0))?;
                f(El::Dict(&event.details))?;
                payload_elements(&event.payload, f)
            }
            Message::Call {
                request,
                options,
                procedure,
                payload,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))?;
                f(El::Str(procedure))?;
                payload_elements(payload, f)
            }
            Message::Cancel { request, options } | Message::Interrupt { request, options } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))
            }
            Message::Result {
                request,
                details,
                payload,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(details))?;
                payload_elements(payload, f)
            }
            Message::Register {
                request,
                options,
                procedure,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))?;
                f(El::Str(procedure))
            }
            Message::Registered {
                request,
                registration,
            } => {
                f(El::UInt(request.0))?;
                f(El::UInt(registration.0))
            }
            Message::Unregister {
                request,
                registration,
            } => {
                f(El::UInt(request.0))?;
                f(El::UInt(registration.0))
            }
            Message::Invocation(inv) => {
                f(El::UInt(inv.request.0))?;
                f(El::UInt(inv.registration.0))?;
                f(El::Dict(&inv.details))?;
                payload_elements(&inv.payload, f)
            }
            Message::Yield {
                request,
                options,
                payload,
            } => {
                f(El::UInt(request.0))?;
                f(El::Dict(options))?;
                payload_elements(payload, f)
            }
        }
    }

    /// How many elements [`Message::for_each_element`] will visit; the
    /// MessagePack encoder needs it up front for the array header.
    pub fn element_count(&self) -> usize {
        let mut n = 0usize;
        let _ = self.for_each_element(|_| {
            n += 1;
            Ok::<(), ()>(())
        });
        n
    }
}

/// The spec's name of a message type code, if it is one we know.
pub fn name_of(code: u64) -> Option<&'static str> {
    Some(match code {
        code::HELLO => "HELLO",
        code::WELCOME => "WELCOME",
        code::ABORT => "ABORT",
        code::CHALLENGE => "CHALLENGE",
        code::AUTHENTICATE => "AUTHENTICATE",
        code::GOODBYE => "GOODBYE",
        code::ERROR => "ERROR",
        code::PUBLISH => "PUBLISH",
        code::PUBLISHED => "PUBLISHED",
        code::SUBSCRIBE => "SUBSCRIBE",
        code::SUBSCRIBED => "SUBSCRIBED",
        code::UNSUBSCRIBE => "UNSUBSCRIBE",
        code::UNSUBSCRIBED => "UNSUBSCRIBED",
        code::EVENT => "EVENT",
        code::CALL => "CALL",
        code::CANCEL => "CANCEL",
        code::RESULT => "RESULT",
        code::REGISTER => "REGISTER",
        code::REGISTERED => "REGISTERED",
        code::UNREGISTER => "UNREGISTER",
        code::UNREGISTERED => "UNREGISTERED",
        code::INVOCATION => "INVOCATION",
        code::INTERRUPT => "INTERRUPT",
        code::YIELD => "YIELD",
        _ => return None,
    })
}

/// One top-level element of a message on the wire, borrowed from the message.
#[derive(Debug, Clone, Copy)]
pub enum Element<'a> {
    UInt(u64),
    Str(&'a str),
    Dict(&'a Dict),
    List(&'a [Value]),
}

fn payload_elements<E>(
    payload: &Payload,
    mut f: impl FnMut(Element<'_>) -> Result<(), E>,
) -> Result<(), E> {
    if !payload.kwargs.is_empty() {
        f(Element::List(&payload.args))?;
        f(Element::Dict(&payload.kwargs))
    } else if !payload.args.is_empty() {
        f(Element::List(&payload.args))
    } else {
        Ok(())
    }
}

/// A cursor over a message's elements that takes fields off the front with
/// type checks, so each arm of `from_list` reads like the spec's layout.
struct Fields {
    message: &'static str,
    code: u64,
    len: usize,
    rest: std::vec::IntoIter<Value>,
}

impl Fields {
    fn new(list: Vec<Value>) -> Result<Fields, MessageError> {
        let len = list.len();
        let mut rest = list.into_iter();
        let code = match rest.next() {
            Some(Value::UInt(code)) => code,
            Some(other) => {
                return Err(MessageError::Field {
                    message: "message",
                    field: "Type",
                    expected: "an integer",
                    got: other.kind(),
                });
            }
            None => return Err(MessageError::NotAList("an empty list")),
        };
        let message = name_of(code).ok_or(MessageError::UnknownType(code))?;
        Ok(Fields {
            message,
            code,
            len,
            rest,
        })
    }

    fn expect_len(&self, n: usize, expected: &'static str) -> Result<(), MessageError> {
        self.expect_len_between(n, n, expected)
    }

    fn expect_len_between(
        &self,
        min: usize,
        max: usize,
        expected: &'static str,
    ) -> Result<(), MessageError> {
        if (min..=max).contains(&self.len) {
            Ok(())
        } else {
            Err(MessageError::Length {
                message: self.message,
                got: self.len,
                expected,
            })
        }
    }

    fn wrong(&self, field: &'static str, expected: &'static str, got: &Value) -> MessageError {
        MessageError::Field {
            message: self.message,
            field,
            expected,
            got: got.kind(),
        }
    }

    fn next(&mut self) -> Value {
        // Lengths are checked before any field is read, so a missing required
        // field cannot happen; Null then fails the field's type check anyway.
        self.rest.next().unwrap_or(Value::Null)
    }

    fn uint(&mut self, field: &'static str) -> Result<u64, MessageError> {
        match self.next() {
            Value::UInt(v) => Ok(v),
            other => Err(self.wrong(field, "a non-negative integer", &other)),
        }
    }

    /// A WAMP id: an integer in [1, 2^53]. Crossbar never sends 0 where an id
    /// is required, and accepting it would let a bogus frame match nothing.
    fn id(&mut self, field: &'static str) -> Result<u64, MessageError> {
        match self.next() {
            Value::UInt(v) if (1..=super::id::MAX_ID).contains(&v) => Ok(v),
            Value::UInt(_) => Err(MessageError::Field {
                message: self.message,
                field,
                expected: "an id in [1, 2^53]",
                got: "an integer out of range",
            }),
            other => Err(self.wrong(field, "an id", &other)),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, MessageError> {
        match self.next() {
            Value::Str(s) => Ok(s),
            other => Err(self.wrong(field, "a string", &other)),
        }
    }

    fn dict(&mut self, field: &'static str) -> Result<Dict, MessageError> {
        match self.next() {
            Value::Dict(d) => Ok(d),
            other => Err(self.wrong(field, "a dict", &other)),
        }
    }

    fn optional_dict(&mut self, field: &'static str) -> Result<Dict, MessageError> {
        match self.rest.next() {
            None => Ok(Dict::new()),
            Some(Value::Dict(d)) => Ok(d),
            Some(other) => Err(self.wrong(field, "a dict", &other)),
        }
    }

    fn payload(&mut self) -> Result<Payload, MessageError> {
        let args = match self.rest.next() {
            None => Vec::new(),
            Some(Value::List(l)) => l,
            Some(other) => return Err(self.wrong("Arguments", "a list", &other)),
        };
        let kwargs = self.optional_dict("ArgumentsKw")?;
        Ok(Payload { args, kwargs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: Vec<Value>) -> Vec<Value> {
        items
    }

    fn elements(msg: &Message) -> Vec<String> {
        let mut out = Vec::new();
        msg.for_each_element(|e| {
            out.push(format!("{e:?}"));
            Ok::<(), ()>(())
        })
        .unwrap();
        out
    }

    #[test]
    fn event_without_payload_parses_with_empty_args_and_kwargs() {
        let msg = Message::from_list(list(vec![
            36u64.into(),
            5u64.into(),
            6u64.into(),
            Dict::new().into(),
        ]))
        .unwrap();
        let Message::Event(ev) = msg else {
            panic!("not an event")
        };
        assert_eq!(ev.subscription, SubscriptionId(5));
        assert_eq!(ev.publication, PublicationId(6));
        assert!(ev.payload.is_empty());
    }

    #[test]
    fn trailing_empty_payload_parts_are_omitted_on_encode() {
        let mut call = Message::Call {
            request: RequestId(1),
            options: Dict::new(),
            procedure: "p".into(),
            payload: Payload::default(),
        };
        assert_eq!(elements(&call).len(), 4);
        assert_eq!(call.element_count(), 4);
        if let Message::Call { payload, .. } = &mut call {
            payload.args.push(1u64.into());
        }
        assert_eq!(call.element_count(), 5);
        if let Message::Call { payload, .. } = &mut call {
            payload.args.clear();
            payload.kwargs.insert("k", 1u64);
        }
        // kwargs without args still needs an (empty) args list before it.
        assert_eq!(call.element_count(), 6);
        assert_eq!(elements(&call)[4], "List([])");
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        let err = Message::from_list(vec![99u64.into(), 1u64.into()]).unwrap_err();
        assert_eq!(err, MessageError::UnknownType(99));
    }

    #[test]
    fn wrong_field_type_names_the_message_and_field() {
        let err = Message::from_list(vec![33u64.into(), "one".into(), Value::UInt(7)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SUBSCRIBED.SUBSCRIBE.Request must be an id, got a string"
        );
    }

    #[test]
    fn ids_outside_the_wamp_range_are_rejected() {
        for bad in [0u64, (1 << 53) + 1] {
            let err = Message::from_list(vec![33u64.into(), 1u64.into(), bad.into()]);
            assert!(err.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let err = Message::from_list(vec![33u64.into(), 1u64.into()]).unwrap_err();
        assert!(matches!(err, MessageError::Length { .. }), "{err}");
        let err = Message::from_list(vec![
            36u64.into(),
            1u64.into(),
            2u64.into(),
            Dict::new().into(),
            Vec::<Value>::new().into(),
            Dict::new().into(),
            Value::Null,
        ])
        .unwrap_err();
        assert!(matches!(err, MessageError::Length { .. }), "{err}");
    }

    #[test]
    fn type_code_must_be_a_non_negative_integer() {
        assert!(Message::from_list(vec!["HELLO".into()]).is_err());
        assert!(Message::from_list(vec![Value::Int(-1)]).is_err());
        assert!(Message::from_list(vec![]).is_err());
    }

    #[test]
    fn revocation_unsubscribed_with_request_zero_and_details_parses() {
        let msg = Message::from_list(vec![
            35u64.into(),
            0u64.into(),
            Dict::new().with("subscription", 9u64).into(),
        ])
        .unwrap();
        let Message::Unsubscribed { request, details } = msg else {
            panic!()
        };
        assert_eq!(request, RequestId(0));
        assert_eq!(details.get_u64("subscription"), Some(9));
    }
}

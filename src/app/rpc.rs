//! The requests the app makes to the router for discovery (meta-topic
//! subscriptions, `wamp.registration.list`/`get`, topic subscriptions), as
//! futures that report back tagged with what they were for. They belong to
//! one session: the app drops them all when the session ends, so an answer
//! from an old session can never reach the rebuilt discovery state.

use futures_util::future::BoxFuture;

use crate::discovery::TopicKey;
use crate::discovery::meta;
use crate::discovery::topic::MatchPolicy;
use crate::wamp::{
    CallResult, Client, Dict, Payload, RegistrationId, RequestError, SubscriptionId, Value,
};

/// A finished discovery request.
pub enum RpcDone {
    MetaSubscribed(&'static str, Result<SubscriptionId, RequestError>),
    Listed(Result<CallResult, RequestError>),
    Got(RegistrationId, Result<CallResult, RequestError>),
    Subscribed(TopicKey, Result<SubscriptionId, RequestError>),
    Unsubscribed(SubscriptionId, Result<(), RequestError>),
}

pub type Rpc = BoxFuture<'static, RpcDone>;

pub fn meta_subscribe(client: &Client, topic: &'static str) -> Rpc {
    let client = client.clone();
    Box::pin(
        async move { RpcDone::MetaSubscribed(topic, client.subscribe(topic, Dict::new()).await) },
    )
}

pub fn list(client: &Client) -> Rpc {
    let client = client.clone();
    Box::pin(async move {
        RpcDone::Listed(
            client
                .call(meta::LIST, Payload::default(), Dict::new(), None)
                .await,
        )
    })
}

pub fn get(client: &Client, id: RegistrationId) -> Rpc {
    let client = client.clone();
    Box::pin(async move {
        let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
        RpcDone::Got(id, client.call(meta::GET, args, Dict::new(), None).await)
    })
}

pub fn subscribe(client: &Client, key: TopicKey) -> Rpc {
    let client = client.clone();
    Box::pin(async move {
        let options = match key.policy {
            MatchPolicy::Wildcard => Dict::new().with("match", "wildcard"),
            // Prefix topics are never subscribed (discovery ignores prefix
            // registrations); exact is the default and needs no option.
            MatchPolicy::Prefix => Dict::new().with("match", "prefix"),
            MatchPolicy::Exact => Dict::new(),
        };
        let result = client.subscribe(&key.topic, options).await;
        RpcDone::Subscribed(key, result)
    })
}

pub fn unsubscribe(client: &Client, subscription: SubscriptionId) -> Rpc {
    let client = client.clone();
    Box::pin(
        async move { RpcDone::Unsubscribed(subscription, client.unsubscribe(subscription).await) },
    )
}

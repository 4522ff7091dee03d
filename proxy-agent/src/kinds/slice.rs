//! An EndpointSlice: its address type, ports, and each endpoint's
//! addresses, conditions, node, zone and topology hints.

use serde::Deserialize;

use super::{Kind, Meta, list, or_default, some_list};

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "Meta::or_empty")]
    pub metadata: Meta,
    #[serde(default, deserialize_with = "or_default")]
    pub address_type: String,
    #[serde(default, deserialize_with = "list")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "some_list")]
    pub ports: Option<Vec<EndpointPort>>,
}

impl Kind for EndpointSlice {
    type Of = k8s_openapi::api::discovery::v1::EndpointSlice;

    fn meta(&self) -> &Meta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.metadata
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "list")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    /// Boxed: most endpoints have none, and every endpoint is held.
    pub hints: Option<Box<EndpointHints>>,
    pub node_name: Option<Box<str>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    #[serde(default, deserialize_with = "some_list")]
    pub for_nodes: Option<Vec<ForNode>>,
    #[serde(default, deserialize_with = "some_list")]
    pub for_zones: Option<Vec<ForZone>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForNode {
    #[serde(default, deserialize_with = "or_default")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForZone {
    #[serde(default, deserialize_with = "or_default")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

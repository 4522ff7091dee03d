//! Services, EndpointSlices and this node's Node from the API server, through
//! kube-rs watchers: list, then watch from the listed version, relist after
//! 410 Gone, back off on errors. Errors are reported and never end a watch.

use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use crate::kinds::{EndpointSlice, KEPT_ANNOTATIONS, Service, Watched};

/// One thing a watch reported.
pub enum Change {
    // Boxed: the objects are large and differ in size; they are moved once.
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    /// A watch failed (it retries with backoff); the text says which and why.
    Trouble(Resource, String),
    /// The API server answered a probe: watches that failed can recover
    /// silently (a re-watch with nothing new yields no event), so this is
    /// how the agent learns that it can reach the server again.
    Reachable,
}

/// The watched resources, for readiness reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
    /// The periodic probe.
    ApiServer,
}

impl Change {
    pub fn resource(&self) -> Resource {
        match self {
            Change::Service(_) => Resource::Services,
            Change::Slice(_) => Resource::EndpointSlices,
            Change::Node(_) => Resource::Node,
            Change::Trouble(r, _) => *r,
            Change::Reachable => Resource::ApiServer,
        }
    }
}

/// The client configuration from `--kubeconfig`, else KUBECONFIG,
/// ~/.kube/config or the in-cluster service account, as kubectl finds
/// them; `apiserver` (`--kube-apiserver`) replaces the server they name,
/// and alone (no credentials anywhere) makes an anonymous configuration.
pub async fn config(kubeconfig: Option<&Path>, apiserver: Option<&str>) -> anyhow::Result<Config> {
    let found = match kubeconfig {
        Some(path) => Some(from_file(path).await?),
        None => Config::infer().await.ok(),
    };
    let config = match (found, apiserver) {
        (Some(mut config), Some(url)) => {
            config.cluster_url = server(url)?;
            config
        }
        (Some(config), None) => config,
        (None, Some(url)) => Config::new(server(url)?),
        (None, None) => anyhow::bail!(
            "no kubeconfig: give --kubeconfig, --kube-apiserver or --manifests, set \
             KUBECONFIG, or run in a pod"
        ),
    };
    Ok(config)
}

/// A client of `config`.
pub fn client(config: Config) -> anyhow::Result<Client> {
    Client::try_from(config).context("building the Kubernetes client")
}

/// `config` with its server moved to `addr`, same scheme and credentials.
pub fn via(config: &Config, addr: std::net::SocketAddr) -> anyhow::Result<Config> {
    let scheme = config.cluster_url.scheme_str().unwrap_or("https");
    let mut moved = config.clone();
    moved.cluster_url = server(&format!("{scheme}://{addr}"))?;
    // The certificate still names the server the configuration named.
    if moved.tls_server_name.is_none() {
        moved.tls_server_name = config.cluster_url.host().map(str::to_string);
    }
    Ok(moved)
}

/// True if the API server answers `client` within `timeout`.
pub async fn answers(client: &Client, node_name: &str, timeout: std::time::Duration) -> bool {
    let nodes = Api::<Node>::all(client.clone());
    let params = kube::api::ListParams::default()
        .fields(&format!("metadata.name={node_name}"))
        .limit(1);
    matches!(
        tokio::time::timeout(timeout, nodes.list(&params)).await,
        Ok(Ok(_))
    )
}

fn server<U: std::str::FromStr>(url: &str) -> anyhow::Result<U>
where
    U::Err: std::error::Error + Send + Sync + 'static,
{
    url.parse()
        .with_context(|| format!("--kube-apiserver {url:?} is not a URL"))
}

async fn from_file(path: &Path) -> anyhow::Result<Config> {
    let file =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using {}", path.display()))
}

/// What the watches need from RBAC: (API group, resource) with the verbs
/// below, for the three types `watch` uses. deploy/'s ClusterRole is tested
/// against this.
pub fn watched() -> [(&'static str, &'static str); 3] {
    fn of<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
        (K::GROUP, K::URL_PATH_SEGMENT)
    }
    [
        of::<Watched<Service>>(),
        of::<Watched<EndpointSlice>>(),
        of::<Node>(),
    ]
}

/// A watcher lists, then watches.
pub const VERBS: [&str; 2] = ["list", "watch"];

/// The running watches; dropping them stops them.
pub struct Watches(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the three watches; their events arrive on `changes`.
pub fn watch(client: Client, node_name: &str, changes: UnboundedSender<Change>) -> Watches {
    let all = watcher::Config::default().labels(crate::model::OURS_SELECTOR);
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    Watches(vec![
        spawn(
            Api::<Watched<Service>>::all(client.clone()),
            all.clone(),
            changes.clone(),
            |event| Change::Service(Box::new(held(event))),
            Resource::Services,
        ),
        spawn(
            Api::<Watched<EndpointSlice>>::all(client.clone()),
            all,
            changes.clone(),
            |event| Change::Slice(Box::new(held(event))),
            Resource::EndpointSlices,
        ),
        probe(client.clone(), node_name.to_string(), changes.clone()),
        spawn(
            Api::<Node>::all(client),
            node,
            changes,
            |event| Change::Node(Box::new(event.modify(trim_node))),
            Resource::Node,
        ),
    ])
}

/// The event with the objects as the store holds them.
fn held<T>(event: watcher::Event<Watched<T>>) -> watcher::Event<T> {
    use watcher::Event::*;
    match event {
        Apply(object) => Apply(object.object()),
        Delete(object) => Delete(object.object()),
        Init => Init,
        InitApply(object) => InitApply(object.object()),
        InitDone => InitDone,
    }
}

/// How often the API server is probed while the agent runs.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Lists this node (one small object) every `PROBE_EVERY`.
fn probe(
    client: Client,
    node_name: String,
    changes: UnboundedSender<Change>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let nodes = Api::<Node>::all(client);
        let params = kube::api::ListParams::default()
            .fields(&format!("metadata.name={node_name}"))
            .limit(1);
        loop {
            let change = match nodes.list(&params).await {
                Ok(_) => Change::Reachable,
                Err(e) => {
                    Change::Trouble(Resource::ApiServer, format!("probing the API server: {e}"))
                }
            };
            if changes.send(change).is_err() {
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    })
}

fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    changes: UnboundedSender<Change>,
    wrap: fn(watcher::Event<K>) -> Change,
    resource: Resource,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(event) => wrap(event),
                Err(e) => Change::Trouble(resource, format!("watching {resource:?}: {e}")),
            };
            if changes.send(change).is_err() {
                return;
            }
        }
    })
}

/// Drops what the model never reads from the Node (the one object still
/// decoded as k8s-openapi's type; Services and EndpointSlices never decode
/// these, see `kinds`): managed fields, owner references, the annotations it
/// does not read.
fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| KEPT_ANNOTATIONS.contains(&key.as_str()));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Also the images and volumes the Node's status lists.
pub fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata);
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{ContainerImage, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry,
    };

    #[test]
    fn a_node_keeps_what_the_model_reads_and_nothing_else() {
        let mut node = Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some([(crate::model::ZONE_LABEL.into(), "z1".into())].into()),
                annotations: Some([("other".to_string(), "x".to_string())].into()),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                images: Some(vec![ContainerImage::default()]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        trim_node(&mut node);
        let meta = &node.metadata;
        assert_eq!((&meta.managed_fields, &meta.annotations), (&None, &None));
        assert!(meta.labels.is_some(), "labels are read: kept");
        assert_eq!(node.status.and_then(|s| s.images), None);
    }
}

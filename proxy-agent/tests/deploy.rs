//! Every manifest in deploy/ parses as the Kubernetes type it claims to be,
//! the ClusterRole grants exactly what the agent's watches use, and the
//! DaemonSet gives the agent what it needs and no more: capabilities, not a
//! privileged container; the host's cgroup v2 root; the API server's own
//! address; an image named by the agent's version.

use std::{collections::BTreeSet, path::PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use proxy_agent::source::kubernetes::{VERBS, watched};
use serde::Deserialize;

#[derive(Default)]
struct Deploy {
    daemonsets: Vec<DaemonSet>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

fn typed<T: for<'de> Deserialize<'de>>(doc: serde_yaml::Value, file: &str) -> T {
    serde_path_to_error::deserialize(doc)
        .unwrap_or_else(|e| panic!("{file}: field {}: {}", e.path(), e.inner()))
}

fn deploy() -> Deploy {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Deploy::default();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value =
                serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("DaemonSet") => out.daemonsets.push(typed(value, &name)),
                Some("ServiceAccount") => out.accounts.push(typed(value, &name)),
                Some("ClusterRole") => out.roles.push(typed(value, &name)),
                Some("ClusterRoleBinding") => out.bindings.push(typed(value, &name)),
                Some("ConfigMap") => out.config_maps.push(typed(value, &name)),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    assert!(files >= 2, "deploy/ has its manifests");
    out
}

#[test]
fn the_cluster_role_grants_exactly_what_the_watches_use() {
    let deploy = deploy();
    assert_eq!(deploy.roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in deploy.roles[0].rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        let names = rule.resource_names.clone().unwrap_or_default();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let grant = (group.clone(), resource.clone(), verb.clone());
                    granted.insert((grant, names.clone()));
                }
            }
        }
    }
    let mut needed: BTreeSet<_> = watched()
        .iter()
        .flat_map(|(group, resource)| {
            VERBS.iter().map(|verb| {
                let grant = (group.to_string(), resource.to_string(), verb.to_string());
                (grant, Vec::new())
            })
        })
        .collect();
    // The cluster's hash key: one read of one namespace, nothing more.
    let key = ("".to_string(), "namespaces".to_string(), "get".to_string());
    needed.insert((key, vec!["kube-system".to_string()]));
    assert_eq!(granted, needed, "granted vs needed");
}

#[test]
fn the_daemonset_runs_the_agent_as_a_node_proxy_needs() {
    let deploy = deploy();
    let spec = pod_spec(&deploy);
    assert_eq!(spec.host_network, Some(true));
    let account = deploy.accounts[0].metadata.name.clone();
    assert_eq!(spec.service_account_name, account);
    let binding = &deploy.bindings[0];
    assert_eq!(
        binding.role_ref.name,
        deploy.roles[0].metadata.name.clone().expect("role name")
    );
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| Some(&s.name) == account.as_ref())
    );
    let agent = &spec.containers[0];
    assert_eq!(
        agent
            .args
            .as_ref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("run")
    );
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("http probe");
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256);
    assert_eq!(
        probe_path(&agent.liveness_probe),
        ("/livez".to_string(), port.clone())
    );
    assert_eq!(
        probe_path(&agent.readiness_probe),
        ("/readyz".to_string(), port)
    );
    let bpffs = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref().filter(|h| h.path == "/sys/fs/bpf"));
    assert!(
        bpffs.is_some(),
        "bpffs from the host, so pins outlive the pod"
    );
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
}

fn pod_spec(deploy: &Deploy) -> &PodSpec {
    assert_eq!(deploy.daemonsets.len(), 1);
    deploy.daemonsets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn args(agent: &Container) -> Vec<&str> {
    agent.args.iter().flatten().map(String::as_str).collect()
}

#[test]
fn the_agent_gets_capabilities_not_a_privileged_container() {
    let deploy = deploy();
    let spec = pod_spec(&deploy);
    let security = spec.containers[0]
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true), "privileged");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let wanted = [
        "BPF",
        "NET_ADMIN",
        "PERFMON",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "SYS_RESOURCE",
    ];
    assert_eq!(added, BTreeSet::from(wanted));
    // Sockets of every pod are reached through /proc/<pid>/ns/net.
    assert_eq!(spec.host_pid, Some(true));
}

#[test]
fn the_image_is_the_agents_version_never_latest() {
    let deploy = deploy();
    let agent = &pod_spec(&deploy).containers[0];
    let image = agent.image.as_deref().expect("image");
    let (_, tag) = image.rsplit_once(':').expect("a tagged image");
    assert_ne!(tag, "latest");
    assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{image}");
    assert_eq!(agent.image_pull_policy.as_deref(), Some("IfNotPresent"));
}

#[test]
fn socket_hooks_get_the_hosts_cgroup_root() {
    let deploy = deploy();
    let spec = pod_spec(&deploy);
    let agent = &spec.containers[0];
    let inside = "/run/xdproxy/cgroupv2";
    assert!(
        args(agent).contains(&format!("--cgroup-root={inside}").as_str()),
        "{:?}",
        args(agent)
    );
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == inside)
        .expect("cgroup v2 mount");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.host_path.as_ref())
        .expect("cgroup v2 hostPath");
    assert_eq!(volume.path, "/sys/fs/cgroup");
}

#[test]
fn the_api_server_is_reached_directly_with_the_address_from_the_config_map() {
    let deploy = deploy();
    let agent = &pod_spec(&deploy).containers[0];
    assert_eq!(deploy.config_maps.len(), 1);
    let config = &deploy.config_maps[0];
    let name = config.metadata.name.as_deref().expect("ConfigMap name");
    assert_eq!(config.metadata.namespace.as_deref(), Some("kube-system"));
    for key in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let from = agent
            .env
            .iter()
            .flatten()
            .find(|e| e.name == key)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.config_map_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{key} from a ConfigMap"));
        assert_eq!((from.name.as_str(), from.key.as_str()), (name, key));
        assert!(
            config.data.as_ref().is_some_and(|d| d.contains_key(key)),
            "{name} has {key}"
        );
    }
    assert!(args(agent).contains(&"--node-name=$(NODE_NAME)"));
    // The same address as the agent's bootstrap URL, so it can move its
    // watches to the kubernetes Service once it serves it, and come back.
    assert!(
        args(agent).contains(
            &"--kube-apiserver=https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"
        ),
        "{:?}",
        args(agent)
    );
}

//! Services, EndpointSlices and Nodes from Kubernetes YAML: a file or a directory of
//! `.yaml`, `.yml` and `.json` files (not recursive), multi-document, `kind:
//! List` included, as `kubectl apply -f` takes them.
//!
//! An object that fails to parse or validate is reported with its file, name
//! and field. Its last valid version, if any, is kept, as is everything from a
//! file that cannot be read or parsed at all: bad input never removes state
//! that was good.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;
use serde_yaml::Value;

use super::host;
use crate::kinds::{EndpointSlice, Service};
use crate::model::{self, FieldError, ObjectKey, Objects, ThisNode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// This node's own Node object gives its addresses (for NodePorts) and
    /// zone; other Nodes are ignored.
    Node,
}

#[derive(Clone, Debug)]
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// One problem in the input, and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// "Service default/web", or None when the problem is the whole file.
    pub object: Option<String>,
    pub problem: String,
    /// What stays programmed instead.
    pub kept: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}; {}", self.problem, self.kept)
    }
}

type Id = (Kind, ObjectKey);

/// Reads the manifests and remembers the last valid version of each object.
pub struct ManifestSource {
    path: PathBuf,
    /// This node as the flags give it; its Node object, if the manifests
    /// hold it, adds the rest.
    node: ThisNode,
    last_good: BTreeMap<Id, (PathBuf, Object)>,
    fingerprint: Option<Vec<(PathBuf, u64, Option<SystemTime>)>>,
    /// The host addresses last logged.
    told_host: Option<Vec<std::net::IpAddr>>,
}

/// The objects of one read, and the problems found.
pub struct Load {
    pub objects: Objects,
    pub errors: Vec<ManifestError>,
}

impl ManifestSource {
    /// Reads `path` for the node `node` (as its flags give it).
    pub fn new(path: impl Into<PathBuf>, node: ThisNode) -> Self {
        ManifestSource {
            path: path.into(),
            node,
            last_good: BTreeMap::new(),
            fingerprint: None,
            told_host: None,
        }
    }

    /// True when the files changed since the last `load` (or none happened).
    pub fn changed(&self) -> bool {
        self.fingerprint.as_ref() != Some(&fingerprint(&self.path))
    }

    pub fn load(&mut self) -> Load {
        self.fingerprint = Some(fingerprint(&self.path));
        let mut found: BTreeMap<Id, (PathBuf, Object)> = BTreeMap::new();
        let mut errors = Vec::new();
        match files(&self.path) {
            Ok(files) => {
                for file in files {
                    self.read_file(&file, &mut found, &mut errors);
                }
            }
            Err(problem) => {
                errors.push(ManifestError {
                    file: self.path.clone(),
                    object: None,
                    problem,
                    kept: "kept every object read before".into(),
                });
                found = self.last_good.clone();
            }
        }
        self.last_good = found;
        let mut objects = objects(&self.last_good);
        let node = self.node.name.as_ref().and_then(|name| {
            let key = (Kind::Node, node_key(name));
            match self.last_good.get(&key) {
                Some((_, Object::Node(node))) => Some(node.as_ref()),
                _ => None,
            }
        });
        objects.node = self.node.seeing(node);
        objects.node.host_addresses = self.host_addresses(&objects.node.addresses);
        Load { objects, errors }
    }

    /// The host's addresses, read when the Node gives none of a family, so
    /// that source NAT still has an address to use.
    fn host_addresses(&mut self, node: &[std::net::IpAddr]) -> Vec<std::net::IpAddr> {
        if node.iter().any(|a| a.is_ipv4()) && node.iter().any(|a| a.is_ipv6()) {
            return Vec::new();
        }
        let found = match host::addresses() {
            Ok(found) => found,
            Err(e) => {
                log::warn!("cannot read the host's addresses for source NAT: {e}");
                Vec::new()
            }
        };
        if self.told_host.as_ref() != Some(&found) {
            log::info!(
                "no Node object for this node gives every family an address; \
                 source NAT uses the host's first ones: {found:?}"
            );
            self.told_host = Some(found.clone());
        }
        found
    }

    fn read_file(
        &self,
        file: &Path,
        found: &mut BTreeMap<Id, (PathBuf, Object)>,
        errors: &mut Vec<ManifestError>,
    ) {
        let documents = fs::read_to_string(file)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| documents(&text));
        let documents = match documents {
            Ok(documents) => documents,
            Err(problem) => {
                let kept = self.keep_file(file, found);
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    object: None,
                    problem,
                    kept: format!("kept the {kept} object(s) last read from it"),
                });
                return;
            }
        };
        for document in documents {
            self.read_document(file, document, found, errors);
        }
    }

    /// Carries over every last-good object that came from `file`.
    fn keep_file(&self, file: &Path, found: &mut BTreeMap<Id, (PathBuf, Object)>) -> usize {
        let mut kept = 0;
        for (id, (from, object)) in &self.last_good {
            if from == file && !found.contains_key(id) {
                found.insert(id.clone(), (from.clone(), object.clone()));
                kept += 1;
            }
        }
        kept
    }

    fn read_document(
        &self,
        file: &Path,
        document: Value,
        found: &mut BTreeMap<Id, (PathBuf, Object)>,
        errors: &mut Vec<ManifestError>,
    ) {
        let kind = document.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind == "List" {
            let items = document.get("items").and_then(Value::as_sequence).cloned();
            for item in items.unwrap_or_default() {
                self.read_document(file, item, found, errors);
            }
            return;
        }
        let Some(kind) = wanted_kind(&document) else {
            log::debug!("{}: ignoring a {kind:?} object", file.display());
            return;
        };
        let key = object_key(kind, &document);
        let id = (kind, key.clone());
        let label = format!("{kind:?} {key}");
        match parse(kind, document) {
            Ok(object) => {
                if found.insert(id, (file.to_path_buf(), object)).is_some() {
                    log::warn!(
                        "{}: {label} is defined more than once; the last one wins",
                        file.display()
                    );
                }
            }
            Err(error) => {
                let kept = match self.last_good.get(&id) {
                    Some(previous) if !found.contains_key(&id) => {
                        found.insert(id, previous.clone());
                        "kept its last valid version".to_string()
                    }
                    _ => "not programmed".to_string(),
                };
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    object: Some(label),
                    problem: error.to_string(),
                    kept,
                });
            }
        }
    }
}

fn wanted_kind(document: &Value) -> Option<Kind> {
    let api = document.get("apiVersion").and_then(Value::as_str);
    match (api, document.get("kind").and_then(Value::as_str)) {
        (Some("v1"), Some("Service")) => Some(Kind::Service),
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => Some(Kind::EndpointSlice),
        (Some("v1"), Some("Node")) => Some(Kind::Node),
        _ => None,
    }
}

/// Namespace and name, read leniently so that even a broken object can be
/// named in an error and matched with its last valid version.
fn object_key(kind: Kind, document: &Value) -> ObjectKey {
    let meta = document.get("metadata");
    let get = |field: &str| meta.and_then(|m| m.get(field)).and_then(Value::as_str);
    let name = get("name").unwrap_or("<unnamed>");
    if kind == Kind::Node {
        return node_key(name);
    }
    ObjectKey {
        namespace: get("namespace").unwrap_or("default").to_string(),
        name: name.to_string(),
    }
}

/// Nodes have no namespace.
fn node_key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: String::new(),
        name: name.to_string(),
    }
}

fn parse(kind: Kind, document: Value) -> Result<Object, FieldError> {
    if document
        .get("metadata")
        .and_then(|m| m.get("name"))
        .is_none()
    {
        return Err(FieldError {
            field: "metadata.name".into(),
            message: "missing".into(),
        });
    }
    match kind {
        Kind::Service => {
            let service: Service = typed(document)?;
            model::validate_service(&service)?;
            Ok(Object::Service(Box::new(service)))
        }
        Kind::EndpointSlice => {
            let slice: EndpointSlice = typed(document)?;
            model::validate_slice(&slice)?;
            Ok(Object::Slice(Box::new(slice)))
        }
        Kind::Node => Ok(Object::Node(Box::new(typed(document)?))),
    }
}

/// Deserializes with the path of the failing field in the error.
fn typed<T: for<'de> Deserialize<'de>>(document: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(document).map_err(|e| FieldError {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| format!("document {} is not valid YAML: {e}", i + 1))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = fs::read_dir(path).map_err(|e| format!("cannot list: {e}"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut all = files(path).unwrap_or_default();
    all.push(path.to_path_buf());
    all.into_iter()
        .map(|p| {
            let meta = fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(u64::MAX, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

fn objects(found: &BTreeMap<Id, (PathBuf, Object)>) -> Objects {
    let mut out = Objects::default();
    for ((_, key), (_, object)) in found {
        match object {
            Object::Service(s) if model::ours(&s.metadata) => {
                out.services.insert(key.clone(), (**s).clone());
            }
            Object::Slice(s) if model::ours(&s.metadata) => {
                out.slices.insert(key.clone(), (**s).clone());
            }
            _ => {}
        }
    }
    out
}

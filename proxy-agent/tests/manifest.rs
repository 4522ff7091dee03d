//! Reading Kubernetes YAML: what is read, what is reported, what is kept.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use proxy_agent::{
    model::ObjectKey,
    source::manifest::{Load, ManifestSource},
};

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("xdproxy-manifest-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("scratch dir");
        Dir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write manifest");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn service(name: &str, port: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: {port}}}]}}\n"
    )
}

const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.1.2]}]\n";

fn port_of(load: &Load, name: &str) -> i32 {
    let svc = &load.objects.services[&key("demo", name)];
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .expect("ports")[0]
        .port
}

fn load(path: &Path) -> (ManifestSource, Load) {
    let mut source = ManifestSource::new(path, Default::default());
    let load = source.load();
    (source, load)
}

#[test]
fn reads_multi_document_files_lists_and_ignores_other_kinds() {
    let dir = Dir::new();
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n  - {}",
        serde_json_like(&service("listed", "81"))
    );
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n";
    let file = dir.write(
        "all.yaml",
        &format!(
            "{}---\n{SLICE}---\n{deployment}---\n{list}",
            service("web", "80")
        ),
    );
    let (_, load) = load(&file);
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    assert_eq!(load.objects.services.len(), 2);
    assert_eq!(load.objects.slices.len(), 1);
    assert_eq!(port_of(&load, "listed"), 81);
}

/// A one-line flow-style mapping of a small YAML document (for `items:`).
fn serde_json_like(yaml: &str) -> String {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("yaml");
    serde_json::to_string(&value).expect("json")
}

#[test]
fn a_directory_takes_yaml_yml_and_json_only() {
    let dir = Dir::new();
    dir.write("a.yaml", &service("a", "80"));
    dir.write(
        "b.yml",
        &service("b", "81").replace("10.96.0.10", "10.96.0.11"),
    );
    let json: serde_json::Value = serde_yaml::from_str(&service("c", "82")).expect("yaml");
    dir.write("c.json", &json.to_string());
    dir.write("d.txt", &service("d", "83"));
    let (_, load) = load(&dir.0);
    let names: Vec<String> = load
        .objects
        .services
        .keys()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn a_malformed_object_is_reported_with_file_object_and_field() {
    let dir = Dir::new();
    let file = dir.write(
        "web.yaml",
        &format!("{}---\n{}", service("web", "eighty"), service("ok", "80")),
    );
    let (_, load) = load(&file);
    assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
    let text = load.errors[0].to_string();
    for part in [
        "web.yaml",
        "Service demo/web",
        "spec.ports[0].port",
        "not programmed",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text:?}");
    }
    assert!(
        load.objects.services.contains_key(&key("demo", "ok")),
        "valid objects are still read"
    );
    assert!(!load.objects.services.contains_key(&key("demo", "web")));
}

#[test]
fn a_broken_update_keeps_the_last_valid_version() {
    let dir = Dir::new();
    let file = dir.write(
        "web.yaml",
        &format!("{}---\n{}", service("web", "80"), service("other", "80")),
    );
    let (mut source, first) = load(&file);
    assert!(first.errors.is_empty());
    fs::write(
        &file,
        format!("{}---\n{}", service("web", "70000"), service("other", "90")),
    )
    .expect("rewrite");
    let second = source.load();
    assert_eq!(second.errors.len(), 1);
    assert!(
        second.errors[0]
            .to_string()
            .contains("kept its last valid version"),
        "{}",
        second.errors[0]
    );
    assert_eq!(port_of(&second, "web"), 80, "the last valid version stays");
    assert_eq!(port_of(&second, "other"), 90, "valid changes apply");
}

#[test]
fn invalid_yaml_keeps_everything_the_file_had() {
    let dir = Dir::new();
    let file = dir.write("web.yaml", &format!("{}---\n{SLICE}", service("web", "80")));
    let (mut source, _) = load(&file);
    fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
    )
    .expect("rewrite");
    let after = source.load();
    assert_eq!(after.errors.len(), 1);
    let text = after.errors[0].to_string();
    assert!(
        text.contains("web.yaml") && text.contains("not valid YAML"),
        "{text}"
    );
    assert_eq!(after.objects.services.len(), 1);
    assert_eq!(after.objects.slices.len(), 1);
}

#[test]
fn a_deleted_file_removes_its_objects_and_a_missing_path_removes_nothing() {
    let dir = Dir::new();
    let a = dir.write("a.yaml", &service("a", "80"));
    dir.write(
        "b.yaml",
        &service("b", "80").replace("10.96.0.10", "10.96.0.11"),
    );
    let (mut source, first) = load(&dir.0);
    assert_eq!(first.objects.services.len(), 2);
    fs::remove_file(&a).expect("remove");
    assert!(source.changed());
    assert_eq!(
        source.load().objects.services.len(),
        1,
        "deleting a file deletes its objects"
    );
    let gone = dir.0.join("nowhere");
    let mut missing = ManifestSource::new(&gone, Default::default());
    let load = missing.load();
    assert_eq!(load.errors.len(), 1);
    assert!(load.errors[0].to_string().contains("nowhere"));
}

#[test]
fn changes_are_noticed_and_no_change_is_quiet() {
    let dir = Dir::new();
    let file = dir.write("web.yaml", &service("web", "80"));
    let (mut source, _) = load(&file);
    assert!(!source.changed());
    fs::write(&file, service("web", "8080")).expect("rewrite");
    assert!(source.changed());
    assert_eq!(port_of(&source.load(), "web"), 8080);
    assert!(!source.changed());
}

#[test]
fn an_invalid_cluster_ip_names_its_field() {
    let dir = Dir::new();
    let file = dir.write(
        "web.yaml",
        &service("web", "80").replace("10.96.0.10", "10.96.0.999"),
    );
    let (_, load) = load(&file);
    assert_eq!(load.errors.len(), 1);
    assert!(
        load.errors[0].to_string().contains("spec.clusterIP"),
        "{}",
        load.errors[0]
    );
}

#[test]
fn objects_of_another_proxy_and_headless_ones_are_ignored() {
    let dir = Dir::new();
    let other = service("other", "80").replace(
        "metadata: {name: other, namespace: demo}",
        "metadata: {name: other, namespace: demo, labels: {service.kubernetes.io/service-proxy-name: someone-else}}",
    );
    let headless_slice = SLICE.replace(
        "labels: {kubernetes.io/service-name: web}",
        "labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: \"\"}",
    );
    let file = dir.write(
        "all.yaml",
        &format!("{}---\n{other}---\n{headless_slice}", service("web", "80")),
    );
    let (_, load) = load(&file);
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    let services: Vec<&ObjectKey> = load.objects.services.keys().collect();
    assert_eq!(services, vec![&key("demo", "web")]);
    assert!(load.objects.slices.is_empty());
}

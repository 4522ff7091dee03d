//! The container image, built and run: `cargo xtask image` builds it, the
//! test mounts it (`podman image mount`) and runs the agent from the image's
//! own root filesystem in a chroot, the way a container runtime would (a
//! private mount namespace with the host's /proc and /sys, a bpffs at
//! /sys/fs/bpf, the node's network namespace, and only the capabilities
//! deploy/daemonset.yaml asks for), against the test API server,
//! with real TCP and UDP traffic through a ClusterIP. Then `proxy-agent
//! cleanup` from the image removes the datapath.
//!
//! Why not `podman run`: these machines mount cgroups in the hybrid layout,
//! which podman's runtime (crun) refuses.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proxy_tests::{
    agent::terminate,
    apiserver::ApiServer,
    cgroup::Cgroup,
    clients::{new_connections, new_udp_flows},
    manifests::{self, HTTP_PORT, UDP_PORT, VIP},
    netns::unique_prefix,
    servers::Servers,
    topology::{Topology, backend_iface, client_iface},
};
use serde_json::Value;

const BACKENDS: usize = 2;
const NODE: &str = "node-1";
const FLOWS: usize = 40;
/// Generous: SYN retransmits come at 1 s and 3 s, and the suite runs many
/// namespaces in parallel on few cores.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Where the image's filesystem is mounted by the runtime (empty in the
/// image); anything else in it must be a file the agent loads.
const MOUNT_POINTS: [&str; 4] = ["proc", "sys/fs/bpf", "run", "tmp"];
/// The kube client refuses to start without system root certificates when
/// its configuration names no CA, as this test's kubeconfig does.
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const BINARY: &str = "usr/bin/proxy-agent";

/// Mounts the host's /proc and /sys, the test's bpffs and its config
/// directory at the image's mount points in a private mount namespace (made
/// by `unshare`, so nothing reaches the host's), and the agent's cgroup at
/// /run/xdproxy/cgroupv2 as the DaemonSet mounts the host's cgroup v2 root
/// (on a tmpfs, as a runtime creates mount points in a writable layer), then
/// runs the image's agent chrooted there, in the node's network namespace,
/// with only the capabilities in `caps` (a setpriv bounding set).
/// Arguments: root, bpffs, config dir, cgroup, network namespace file,
/// caps, agent args.
const CHROOT_SCRIPT: &str = r#"set -e
root=$1 bpffs=$2 config=$3 cgroup=$4 netns=$5 caps=$6
shift 6
mount --bind /proc "$root/proc"
mount --bind /sys "$root/sys"
mount --bind "$bpffs" "$root/sys/fs/bpf"
mount --bind "$config" "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
mkdir -p "$root/run/xdproxy/cgroupv2"
mount --bind "$cgroup" "$root/run/xdproxy/cgroupv2"
exec nsenter --net="$netns" -- setpriv --bounding-set="$caps" -- \
    chroot "$root" /usr/bin/proxy-agent "$@"
"#;

/// The capabilities deploy/daemonset.yaml gives the agent, as a setpriv
/// bounding set, plus SYS_CHROOT for the chroot that stands in for the
/// runtime's pivot_root (the agent itself never uses it).
fn daemonset_capabilities() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let daemonset: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let added = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
        ["add"];
    let added = added
        .as_array()
        .with_context(|| format!("{}: no capabilities.add list", path.display()))?;
    let mut caps = vec!["-all".to_string(), "+sys_chroot".to_string()];
    for cap in added {
        let cap = cap
            .as_str()
            .with_context(|| format!("{}: capability {cap}", path.display()))?;
        caps.push(format!("+{}", cap.to_ascii_lowercase()));
    }
    Ok(caps.join(","))
}

/// Root, and podman to build and mount the image. Under CI=true a missing
/// one is a failure; elsewhere the test says loudly that it did not run.
fn ready(test: &str) -> bool {
    if !proxy_tests::privilege::require_root(test) {
        return false;
    }
    if Command::new("podman").arg("--version").output().is_ok() {
        return true;
    }
    let why = "needs podman (apt-get install podman buildah) to build and mount the image";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} {why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("NOT RUN: {test} {why}");
    false
}

struct Image {
    tag: String,
    id: String,
}

/// Runs `cargo xtask image` (the release build is reused when it is up to
/// date) and reads the image it reports.
fn build_image() -> anyhow::Result<Image> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["xtask", "image"])
        .output()
        .context("starting `cargo xtask image`")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "`cargo xtask image` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "xtask: image localhost/xdproxy:0.1.0 id 3f2a... size 123 bytes (...)"
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("xtask: image "))
        .with_context(|| format!("no image line in `cargo xtask image` output:\n{stdout}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [tag, "id", id, ..] => Ok(Image {
            tag: tag.to_string(),
            id: id.to_string(),
        }),
        _ => bail!("unexpected image line {line:?}"),
    }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The image's filesystem, mounted by podman (read-only) until dropped.
struct Mounted {
    id: String,
    root: PathBuf,
}

impl Mounted {
    fn new(id: &str) -> anyhow::Result<Mounted> {
        let root = output(Command::new("podman").args(["image", "mount", id]))?;
        Ok(Mounted {
            id: id.to_string(),
            root: PathBuf::from(root.trim()),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = output(Command::new("podman").args(["image", "unmount", &self.id])) {
            eprintln!("unmounting image {}: {e:#}", self.id);
        }
    }
}

/// Every path under `root`, relative to it: (files, directories).
fn tree(root: &Path) -> anyhow::Result<(BTreeSet<PathBuf>, BTreeSet<PathBuf>)> {
    let (mut files, mut dirs) = (BTreeSet::new(), BTreeSet::new());
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            let relative = path.strip_prefix(root)?.to_path_buf();
            if path.is_dir() && !path.is_symlink() {
                dirs.insert(relative);
                todo.push(path);
            } else {
                files.insert(relative);
            }
        }
    }
    Ok((files, dirs))
}

/// The image holds the agent, the files the loader maps for it, the CA
/// bundle and the mount points: nothing else.
fn check_contents(root: &Path) -> anyhow::Result<()> {
    let binary = root.join(BINARY);
    let ldd = output(Command::new("ldd").arg(&binary))?;
    let mut needed: BTreeSet<PathBuf> = ldd
        .lines()
        .filter_map(|l| match l.split_once("=>") {
            Some((_, found)) => found.split_whitespace().next(),
            None => l.split_whitespace().next(),
        })
        .filter_map(|p| p.strip_prefix('/'))
        .map(PathBuf::from)
        .collect();
    needed.extend([BINARY, CA_BUNDLE].map(PathBuf::from));
    let (files, dirs) = tree(root)?;
    assert_eq!(files, needed, "the image's files vs what the agent loads");
    let mut allowed: BTreeSet<PathBuf> = BTreeSet::new();
    for path in needed.iter().chain(MOUNT_POINTS.map(PathBuf::from).iter()) {
        allowed.extend(path.ancestors().skip(1).map(Path::to_path_buf));
    }
    allowed.extend(MOUNT_POINTS.map(PathBuf::from));
    allowed.remove(Path::new(""));
    assert_eq!(dirs, allowed, "the image's directories");
    for dir in MOUNT_POINTS {
        let entries = std::fs::read_dir(root.join(dir))
            .with_context(|| format!("listing /{dir} of the image"))?
            .count();
        assert_eq!(entries, 0, "mount point /{dir} is not empty");
    }
    eprintln!("image files: {files:?}");
    Ok(())
}

/// The image's tags: its own version, never `latest`.
fn check_tags(image: &Image, root: &Path) -> anyhow::Result<()> {
    let version = output(
        Command::new("chroot")
            .arg(root)
            .args(["/usr/bin/proxy-agent", "--version"]),
    )?;
    let version = version
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("proxy-agent --version said {version:?}"))?;
    assert_eq!(
        image.tag.rsplit_once(':').map(|(_, tag)| tag),
        Some(version),
        "{}",
        image.tag
    );
    let tags = output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{json .RepoTags}}",
        &image.id,
    ]))?;
    let tags: Vec<String> = serde_json::from_str(tags.trim()).context("RepoTags")?;
    assert!(tags.contains(&image.tag), "{tags:?}");
    assert!(!tags.iter().any(|t| t.ends_with(":latest")), "{tags:?}");
    Ok(())
}

fn json(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("test object")
}

/// Namespaces with backends, an API server in the node namespace, a cgroup
/// for the agent's socket hooks (so they serve no other test's sockets), and
/// a scratch directory: `config/` (the chroot's /tmp, with the kubeconfig),
/// `bpffs/` (a bpffs of this test's own, the chroot's /sys/fs/bpf) and the
/// agent's log.
struct Lab {
    topology: Topology,
    _servers: Vec<Servers>,
    api: ApiServer,
    cgroup: Cgroup,
    caps: String,
    scratch: PathBuf,
}

impl Lab {
    fn start() -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix("img"), BACKENDS)?;
        topology.finish_checksums_on_node_egress()?;
        let servers = topology.start_servers()?;
        let api = ApiServer::start_in(&topology.node)?;
        api.apply(json(&manifests::service()))?;
        api.apply(json(&manifests::slice(&[0, 1])))?;
        api.apply(json(&manifests::node(NODE, &[])))?;
        let scratch = std::env::temp_dir().join(format!("xdproxy-image-{}", topology.prefix()));
        let lab = Lab {
            cgroup: Cgroup::create(topology.node.name())?,
            caps: daemonset_capabilities()?,
            topology,
            _servers: servers,
            api,
            scratch,
        };
        std::fs::create_dir_all(lab.config()).context("scratch config dir")?;
        std::fs::create_dir_all(lab.bpffs()).context("scratch bpffs dir")?;
        output(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(lab.bpffs()),
        )?;
        lab.api.write_kubeconfig(&lab.config().join("kubeconfig"))?;
        Ok(lab)
    }

    fn config(&self) -> PathBuf {
        self.scratch.join("config")
    }

    fn bpffs(&self) -> PathBuf {
        self.scratch.join("bpffs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.join("agent.log")).unwrap_or_default()
    }

    /// `proxy-agent ARGS` from the image, chrooted, in the node namespace.
    fn in_image(&self, root: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", CHROOT_SCRIPT, "sh"])
            .arg(root)
            .arg(self.bpffs())
            .arg(self.config())
            .arg(self.cgroup.path())
            .arg(self.topology.node.path())
            .arg(&self.caps)
            .args(args);
        cmd
    }

    /// Starts `proxy-agent run` from the image and waits for its first sync.
    fn run_agent(&self, root: &Path) -> anyhow::Result<Running> {
        let mut args = vec![
            "run",
            "--kubeconfig",
            "/tmp/kubeconfig",
            "--node-name",
            NODE,
            // As the DaemonSet's; the script mounts the test's cgroup there.
            "--cgroup-root=/run/xdproxy/cgroupv2",
        ];
        let ifaces: Vec<String> = std::iter::once(client_iface().to_string())
            .chain((0..BACKENDS).map(backend_iface))
            .collect();
        for iface in &ifaces {
            args.extend(["--iface", iface]);
        }
        let log = std::fs::File::create(self.scratch.join("agent.log")).context("agent log")?;
        let child = self
            .in_image(root, &args)
            // A pod's environment: nothing of the test's (SSL_CERT_FILE
            // would hide a missing CA bundle).
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the agent from the image")?;
        let mut running = Running { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("synced:") {
            if let Some(status) = running.exited()? {
                bail!("the agent exited ({status}); log:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not sync in 30 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(running)
    }

    /// `proxy-agent cleanup` from the image; the datapath's pins are gone after.
    fn cleanup(&self, root: &Path) -> anyhow::Result<()> {
        output(&mut self.in_image(root, &["cleanup"]))?;
        let pins = self.bpffs().join("xdproxy");
        ensure!(!pins.exists(), "{} is still there", pins.display());
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The datapath's pins live in this bpffs: unmounting it (once the
        // agent is gone) releases the programs even if cleanup never ran.
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.bpffs())
            .output();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The agent process (unshare execs sh, sh execs nsenter, nsenter execs
/// chroot, chroot execs the agent: one pid throughout). Killed if dropped
/// while running.
struct Running {
    child: Option<Child>,
}

impl Running {
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child.try_wait().context("agent status"),
            None => bail!("the agent was already stopped"),
        }
    }

    /// SIGTERM, as the kubelet stops a pod; returns the exit status.
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        terminate(self.child.take().context("the agent was already stopped")?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `CapEff:` mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> anyhow::Result<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|caps| caps.trim().to_string())
        .context("no CapEff line in a process status")
}

/// The agent runs with the DaemonSet's capabilities, not the test's: the
/// same set setpriv gives a process of its own, and less than root's.
fn check_capabilities(lab: &Lab, agent: &Running) -> anyhow::Result<()> {
    let pid = agent.child.as_ref().context("agent not running")?.id();
    let status = format!("/proc/{pid}/status");
    let got = effective_caps(
        &std::fs::read_to_string(&status).with_context(|| format!("reading {status}"))?,
    )?;
    let want = effective_caps(&output(
        Command::new("setpriv")
            .arg(format!("--bounding-set={}", lab.caps))
            .args(["--", "cat", "/proc/self/status"]),
    )?)?;
    assert_eq!(got, want, "the agent's capabilities ({})", lab.caps);
    let ours = effective_caps(&output(Command::new("cat").arg("/proc/self/status"))?)?;
    assert_ne!(got, ours, "the agent kept all of root's capabilities");
    Ok(())
}

/// TCP connections and UDP flows through the ClusterIP reach every backend.
fn check_traffic(lab: &Lab) -> anyhow::Result<()> {
    let all: BTreeSet<String> = (0..BACKENDS).map(|i| format!("backend{i}")).collect();
    let tcp = SocketAddr::V4(SocketAddrV4::new(VIP, HTTP_PORT));
    let seen = new_connections(&lab.topology.client, tcp, FLOWS, TIMEOUT)
        .with_context(|| format!("TCP through {tcp}; agent log:\n{}", lab.log()))?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "TCP {seen:?}"
    );
    let udp = SocketAddr::V4(SocketAddrV4::new(VIP, UDP_PORT));
    let seen = new_udp_flows(&lab.topology.client, udp, FLOWS, TIMEOUT)
        .with_context(|| format!("UDP through {udp}; agent log:\n{}", lab.log()))?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "UDP {seen:?}"
    );
    Ok(())
}

#[test]
fn the_image_runs_the_agent_and_holds_nothing_else() -> anyhow::Result<()> {
    if !ready("the_image_runs_the_agent_and_holds_nothing_else") {
        return Ok(());
    }
    let image = build_image()?;
    // Dropped in reverse: the agent first, then the lab (namespaces,
    // bpffs, scratch), then the image mount.
    let mounted = Mounted::new(&image.id)?;
    check_contents(&mounted.root)?;
    check_tags(&image, &mounted.root)?;
    let lab = Lab::start()?;
    let mut agent = lab.run_agent(&mounted.root)?;
    check_capabilities(&lab, &agent)?;
    check_traffic(&lab)?;
    let status = agent.stop()?;
    assert!(status.success(), "agent exit {status}; log:\n{}", lab.log());
    lab.cleanup(&mounted.root)?;
    Ok(())
}

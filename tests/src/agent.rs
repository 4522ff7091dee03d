//! A `proxy-agent run` process inside a topology's node namespace, with a
//! bpffs of its own so parallel tests never share pins. Dropping it stops the
//! agent, runs `proxy-agent cleanup` and unmounts the private bpffs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use crate::{cgroup::Cgroup, netns::Netns};

pub struct Agent {
    child: Option<Child>,
    binary: PathBuf,
    /// The node namespace's file (the Netns itself belongs to the topology).
    node: PathBuf,
    /// `--manifests PATH` or `--kubeconfig PATH --node-name N`.
    source: Vec<std::ffi::OsString>,
    ifaces: Vec<String>,
    bpffs: PathBuf,
    log: PathBuf,
    /// The agent's own cgroup (`--cgroup-root`): its socket hooks serve
    /// only processes started there, never other tests' sockets.
    cgroup: Cgroup,
    /// False: no `--cgroup-root`, so the hooks go where the agent finds the
    /// hierarchy's root, as on a node (`start_machine_wide`).
    own_cgroup_root: bool,
}

/// The agent binary next to the test executable (target/debug/proxy-agent),
/// or PROXY_AGENT_BIN.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PROXY_AGENT_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary location")?;
    let agent = dir.join("proxy-agent");
    if !agent.exists() {
        bail!(
            "{} not found: build it with `cargo xtask build`",
            agent.display()
        );
    }
    Ok(agent)
}

/// `--manifests PATH --node-name NAME`.
fn from_manifests(manifests: &Path, node_name: &str) -> Vec<std::ffi::OsString> {
    vec![
        "--manifests".into(),
        manifests.as_os_str().to_owned(),
        "--node-name".into(),
        node_name.into(),
    ]
}

/// The node name manifest-driven agents run as (manifests may hold a Node
/// object of this name).
pub const NODE_NAME: &str = "test-node";

impl Agent {
    /// Starts `proxy-agent run --manifests M --node-name test-node --iface I...` in `node`.
    pub fn start(node: &Netns, manifests: &Path, ifaces: &[String]) -> anyhow::Result<Agent> {
        Self::start_binary(binary()?, node, manifests, ifaces)
    }

    /// Starts `proxy-agent run --kubeconfig K --node-name N --iface I...` in `node`.
    pub fn start_kube(
        node: &Netns,
        kubeconfig: &Path,
        node_name: &str,
        ifaces: &[String],
    ) -> anyhow::Result<Agent> {
        let source = vec![
            "--kubeconfig".into(),
            kubeconfig.as_os_str().to_owned(),
            "--node-name".into(),
            node_name.into(),
        ];
        Self::start_with(binary()?, node, source, ifaces)
    }

    /// As `start_kube`, with more flags of `run` (`--kube-apiserver URL`).
    pub fn start_kube_flags(
        node: &Netns,
        kubeconfig: &Path,
        node_name: &str,
        ifaces: &[String],
        flags: &[&str],
    ) -> anyhow::Result<Agent> {
        let mut source: Vec<std::ffi::OsString> = vec![
            "--kubeconfig".into(),
            kubeconfig.as_os_str().to_owned(),
            "--node-name".into(),
            node_name.into(),
        ];
        source.extend(flags.iter().map(Into::into));
        Self::start_with(binary()?, node, source, ifaces)
    }

    /// As `start`, as the node named `node_name`.
    pub fn start_named(
        node: &Netns,
        manifests: &Path,
        node_name: &str,
        ifaces: &[String],
    ) -> anyhow::Result<Agent> {
        Self::start_with(
            binary()?,
            node,
            from_manifests(manifests, node_name),
            ifaces,
        )
    }

    /// As `start`, with the agent binary given.
    pub fn start_binary(
        binary: PathBuf,
        node: &Netns,
        manifests: &Path,
        ifaces: &[String],
    ) -> anyhow::Result<Agent> {
        Self::start_with(binary, node, from_manifests(manifests, NODE_NAME), ifaces)
    }

    /// As `start`, with more flags of `run`.
    pub fn start_flags(
        node: &Netns,
        manifests: &Path,
        ifaces: &[String],
        flags: &[&str],
    ) -> anyhow::Result<Agent> {
        let mut source = from_manifests(manifests, NODE_NAME);
        source.extend(flags.iter().map(Into::into));
        Self::start_with(binary()?, node, source, ifaces)
    }

    /// As `start`, with the socket hooks at the machine's cgroup v2 root
    /// (the agent's default): they see every socket on the machine, other
    /// tests' included, so the manifests must hold frontends no other test
    /// uses.
    pub fn start_machine_wide(node: &Netns, manifests: &Path) -> anyhow::Result<Agent> {
        let mut agent = Self::prepare(binary()?, node, from_manifests(manifests, NODE_NAME), &[])?;
        agent.own_cgroup_root = false;
        agent.spawn()?;
        Ok(agent)
    }

    fn start_with(
        binary: PathBuf,
        node: &Netns,
        source: Vec<std::ffi::OsString>,
        ifaces: &[String],
    ) -> anyhow::Result<Agent> {
        let mut agent = Self::prepare(binary, node, source, ifaces)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// The agent's scratch space and cgroup, not started yet.
    fn prepare(
        binary: PathBuf,
        node: &Netns,
        source: Vec<std::ffi::OsString>,
        ifaces: &[String],
    ) -> anyhow::Result<Agent> {
        let scratch = std::env::temp_dir().join(format!("xdproxy-{}", node.name()));
        std::fs::create_dir_all(&scratch).context("scratch dir")?;
        Ok(Agent {
            child: None,
            binary,
            node: node.path(),
            source,
            ifaces: ifaces.to_vec(),
            bpffs: scratch.join("bpffs"),
            log: scratch.join("agent.log"),
            cgroup: Cgroup::create(node.name())?,
            own_cgroup_root: true,
        })
    }

    /// Starts the process and waits for its first sync.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let syncs = self.log().matches("synced:").count();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("agent log")?;
        // The agent is a host-network process like any other: in the cgroup
        // its hooks serve, so its own connect() to a Service (the API
        // server's) is load balanced as it would be on a node.
        let mut cmd = self.cgroup.command_at(&self.node, &self.binary);
        cmd.arg("run")
            .args(&self.source)
            .arg("--bpffs")
            .arg(&self.bpffs);
        cmd.args(["--poll-ms", "50"]);
        if self.own_cgroup_root {
            cmd.arg("--cgroup-root").arg(self.cgroup.path());
        }
        for iface in &self.ifaces {
            cmd.arg("--iface").arg(iface);
        }
        cmd.stdout(Stdio::null())
            .stderr(log_file)
            .env("RUST_LOG", "info");
        self.child = Some(cmd.spawn().context("starting proxy-agent")?);
        self.wait_for_syncs(syncs + 1, Duration::from_secs(20))
    }

    /// The agent binary, run in the node namespace (no new mount namespace,
    /// so the agent sees the same bpffs as the test).
    fn in_node(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node.display()))
            .arg("--")
            .arg(&self.binary);
        cmd
    }

    /// SIGKILL: the process dies at once and cleans up nothing.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("agent not running")?;
        child.kill().context("killing the agent")?;
        child.wait().context("reaping the agent")?;
        Ok(())
    }

    /// Starts a new agent process, from `binary` if given, on the same
    /// manifests, interfaces and bpffs, and waits for its first sync.
    pub fn restart(&mut self, binary: Option<PathBuf>) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the agent is still running");
        }
        if let Some(binary) = binary {
            self.binary = binary;
        }
        self.spawn()
    }

    /// Where the agent's log is written (it outlives the process).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// The cgroup whose processes the agent's socket hooks serve.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn pins(&self) -> PathBuf {
        self.bpffs.join("xdproxy")
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The names of the interface links pinned now
    /// (`link_<xdp|tc|tcout>_<iface>`), sorted.
    pub fn link_pins(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pins()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                ["link_xdp_", "link_tc_", "link_tcout_"]
                    .iter()
                    .any(|tag| n.starts_with(tag))
            })
            .collect();
        names.sort();
        names
    }

    /// The datapath's global counters by name (`proxy-agent inspect counters`).
    pub fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let out = std::process::Command::new(binary()?)
            .args(["inspect", "counters", "-o", "json", "--bpffs"])
            .arg(&self.bpffs)
            .output()
            .context("running proxy-agent inspect counters")?;
        ensure!(
            out.status.success(),
            "inspect counters failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("inspect counters -o json")?;
        let map = json["counters"]
            .as_object()
            .with_context(|| format!("no counters object in {json}"))?;
        map.iter()
            .map(|(k, v)| {
                let v = v.as_u64().with_context(|| format!("counter {k}: {v}"))?;
                Ok((k.clone(), v))
            })
            .collect()
    }

    /// Waits until the log shows `count` syncs in all.
    pub fn wait_for_syncs(&mut self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("sync {count} times");
        self.wait_until(&what, timeout, |log| {
            log.matches("synced:").count() >= count
        })
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("log {needle:?}");
        self.wait_until(&what, timeout, |log| log.contains(needle))
    }

    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(&self.log()) {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("agent did not {what} in {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait().context("agent status")?
        {
            bail!("agent exited ({status}); log:\n{}", self.log());
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(child) = self.child.take() else {
            bail!("agent already stopped");
        };
        terminate(child)
    }

    /// `proxy-agent cleanup` for this agent's bpffs, in the node namespace.
    pub fn cleanup(&self) -> anyhow::Result<()> {
        let out = self
            .in_node()
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output()
            .context("running proxy-agent cleanup")?;
        if !out.status.success() {
            bail!("cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = self.cleanup() {
            eprintln!("agent cleanup: {e:#}");
        }
        if let Ok(c) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid path; failure (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(scratch) = self.bpffs.parent() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

/// SIGTERM to an agent process, as the kubelet stops a pod, then its exit
/// status; killed (and reaped) if it is still running after 10 s.
pub fn terminate(mut child: Child) -> anyhow::Result<ExitStatus> {
    let pid = i32::try_from(child.id()).context("agent pid")?;
    // SAFETY: kill(2) on our own child, which has not been reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().context("agent status")? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the agent ignored SIGTERM for 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

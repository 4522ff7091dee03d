//! A cgroup v2 directory of a test's own, for an agent's socket hooks
//! (`--cgroup-root`), and client processes started inside it.
//!
//! Socket hooks attached at the machine's real cgroup root would serve every
//! socket on the machine, other tests' included; each agent gets a subtree
//! instead, and only the probes a test starts there are served by it. It is
//! removed on drop, after the processes in it are gone.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// Where the tests' cgroups go, under the cgroup v2 mount.
const PARENT: &str = "xdproxy-tests";

#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/xdproxy-tests/<name>`.
    pub fn create(name: &str) -> Result<Cgroup> {
        let dir = mount()?.join(PARENT).join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Cgroup { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A command that runs `program` in this cgroup, in `ns`.
    pub fn command(&self, ns: &Netns, program: &Path) -> Command {
        self.command_at(&ns.path(), program)
    }

    /// As `command`, with the namespace given by its file.
    pub fn command_at(&self, netns: &Path, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(program);
        let procs = self.dir.join("cgroup.procs");
        // SAFETY: only open/write/close between fork and exec.
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, b"0"));
        }
        cmd
    }

    /// Runs the test probe (`xdproxy-probe ARGS`) in this cgroup, in `ns`,
    /// and returns its JSON lines.
    pub fn probe(&self, ns: &Netns, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        self.probe_with(&probe_binary()?, ns, args)
    }

    /// As `probe`, with the probe binary given.
    pub fn probe_with(
        &self,
        probe: &Path,
        ns: &Netns,
        args: &[&str],
    ) -> Result<Vec<serde_json::Value>> {
        let output = self
            .command(ns, probe)
            .args(args)
            .output()
            .context("running xdproxy-probe")?;
        lines(&output)
    }

    /// Starts the probe in the background; `finish` collects its lines.
    pub fn spawn_probe(&self, ns: &Netns, args: &[&str]) -> Result<std::process::Child> {
        self.command(ns, &probe_binary()?)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting xdproxy-probe")
    }
}

/// Every probe line succeeded; the backends that answered.
pub fn backends(lines: &[serde_json::Value]) -> Result<std::collections::BTreeSet<String>> {
    let mut seen = std::collections::BTreeSet::new();
    for line in lines {
        anyhow::ensure!(line["ok"] == true, "probe failed: {line}");
        seen.insert(line["backend"].as_str().unwrap_or_default().to_string());
    }
    Ok(seen)
}

/// The peer addresses the probe's sockets reported.
pub fn peers(lines: &[serde_json::Value]) -> std::collections::BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l["peer"].as_str().map(str::to_string))
        .collect()
}

/// The JSON lines a probe printed; an error if it failed.
pub fn lines(output: &Output) -> Result<Vec<serde_json::Value>> {
    if !output.status.success() {
        bail!(
            "xdproxy-probe failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("probe line {l:?}")))
        .collect()
}

/// The probe binary, built with the tests (`CARGO_BIN_EXE_*` is only set
/// for this crate's own targets, so it is found next to the test binary).
pub fn probe_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary location")?;
    let probe = dir.join("xdproxy-probe");
    if !probe.exists() {
        bail!("{} not found: `cargo test` builds it", probe.display());
    }
    Ok(probe)
}

/// The cgroup v2 mount of the hierarchy's root.
pub fn mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut fields = left.split_whitespace();
            let root = fields.nth(3)?;
            let point = fields.next()?;
            (right.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
        })
        .context("no cgroup v2 mount: the socket hooks need one (mount -t cgroup2 none DIR)")
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes leave a cgroup a moment after they exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The cgroup v2 directory this process is in now.
pub fn current() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(mount()?.join(relative.trim_start_matches('/')))
}

/// Moves this whole process (every thread) into the cgroup at `dir`: the
/// sockets it makes from then on are served by that cgroup's hooks.
pub fn enter(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving into {}", dir.display()))
}

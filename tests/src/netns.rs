//! Named network namespaces managed through `ip netns`, deleted on drop.
//!
//! Code runs "inside" a namespace in two ways: external programs through
//! `nsenter --net=...` (which, unlike `ip netns exec`, keeps the current mount
//! namespace so bpffs and /sys stay visible), and Rust closures on a fresh
//! thread that has `setns(CLONE_NEWNET)`'d into the namespace. Sockets keep the
//! namespace they were created in, so they may be used from any thread later.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result, bail};

/// Per-process counter so every `unique_prefix` call differs.
static PREFIX_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Width of the pid part of a prefix; 36^5 exceeds Linux's maximum pid (2^22).
const PID_WIDTH: usize = 5;

/// Returns a short prefix for namespace names that is unique per call and per
/// process, so tests running in parallel (threads or processes) never collide.
///
/// Layout: `x`, the pid (5 base-36 chars, fixed width), up to 3 letters of
/// `tag`, then the call counter in decimal. The fixed-width pid and the
/// letters/digits split make the encoding unambiguous. It stays ≤ 12
/// characters for the first 1000 calls of a process (longer afterwards, still
/// unique).
pub fn unique_prefix(tag: &str) -> String {
    let letters: String = tag
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_lowercase())
        .take(3)
        .collect();
    let counter = PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "x{}{letters}{counter}",
        base36(std::process::id(), PID_WIDTH)
    )
}

/// Encodes `value` in base 36, left-padded with zeros to `width`.
fn base36(mut value: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while value > 0 {
        out.push(DIGITS[(value % 36) as usize]);
        value /= 36;
    }
    out.resize(out.len().max(width), b'0');
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a command to completion and returns its stdout; the error carries the
/// command line and its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("failed to spawn {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`/run/netns/NAME`), deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with `ip netns add` and brings its loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        if name.is_empty() || name.contains('/') {
            bail!("invalid network namespace name {name:?}");
        }
        run_checked(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating network namespace {name} (stale from a crashed run? `ip netns del {name}`)"))?;
        // Constructed before any further step so Drop cleans up on failure.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name as known to `ip netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, usable with setns/nsenter.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// A veth pair: `iface` here, its peer `peer_iface` in `peer`, both
    /// down and without addresses.
    pub fn add_veth(&self, iface: &str, peer: &Netns, peer_iface: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            peer_iface,
            "netns",
            peer.name(),
        ])?;
        Ok(())
    }

    /// Sets a sysctl (key like `net.ipv4.ip_forward` or `net/ipv4/ip_forward`) inside the
    /// namespace and reads it back to make sure it took.
    ///
    /// Writes /proc/sys from a setns'ed thread: /proc/sys/net resolves against
    /// the opening task's network namespace, so no external tool is needed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        // Like sysctl(8), accept `/` as separator so keys with dotted parts
        // (e.g. VLAN interface names) can be given unambiguously.
        let rel = if key.contains('/') {
            key.to_string()
        } else {
            key.replace('.', "/")
        };
        let path = PathBuf::from("/proc/sys").join(rel);
        let wanted = value.to_string();
        let result = self.run(move || -> Result<String> {
            std::fs::write(&path, &wanted)
                .with_context(|| format!("writing {}", path.display()))?;
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        });
        let actual = result.and_then(|r| r).with_context(|| {
            format!(
                "setting sysctl {key}={value} in network namespace {}",
                self.name
            )
        })?;
        // Multi-value keys read back tab-separated.
        if actual.split_whitespace().ne(value.split_whitespace()) {
            bail!(
                "sysctl {key} in network namespace {} reads {:?} after writing {value:?}",
                self.name,
                actual.trim()
            );
        }
        Ok(())
    }

    /// A `Command` running `program` inside this namespace via
    /// `nsenter --net=/run/netns/NAME -- program`; add arguments as usual.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a new thread that first enters this namespace, waits for it
    /// and returns its value. A panic in `f` is propagated to the caller.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let handle = self.spawn(f)?;
        match handle.join() {
            Ok(value) => Ok(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Netns::run`] but returns the handle without joining. Returns only
    /// after the thread has entered the namespace, so setns failures surface
    /// here rather than inside the thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let path = self.path();
        let file = File::open(&path)
            .with_context(|| format!("opening namespace file {}", path.display()))?;
        let (entered_tx, entered_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
        let handle = thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                let entered = enter_netns(&file);
                let failed = entered.is_err();
                // The receiver only disappears if the spawner died; nothing to report then.
                let _ = entered_tx.send(entered);
                if failed {
                    // Never run `f` in the wrong namespace. The caller already has
                    // the error; resume_unwind skips the panic hook, so this
                    // unwinds silently and the spawner reaps it.
                    std::panic::resume_unwind(Box::new(()));
                }
                drop(file);
                f()
            })
            .with_context(|| format!("spawning thread for network namespace {}", self.name))?;
        let entered = entered_rx.recv().with_context(|| {
            format!(
                "thread for network namespace {} died before setns",
                self.name
            )
        })?;
        if let Err(err) = entered {
            let _ = handle.join();
            return Err(err).with_context(|| format!("setns into network namespace {}", self.name));
        }
        Ok(handle)
    }
}

/// Moves the calling thread into the network namespace behind `file`.
fn enter_netns(file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open fd; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: deleting network namespace {}: {err:#}", self.name);
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn prefixes_are_short_and_distinct() {
        let a = unique_prefix("lbtest");
        let b = unique_prefix("lbtest");
        assert_ne!(a, b);
        assert!(a.len() <= 12, "{a}");
        assert!(a.starts_with('x'));
    }

    #[test]
    fn base36_pads() {
        assert_eq!(base36(0, 5), "00000");
        assert_eq!(base36(35, 5), "0000z");
        assert_eq!(base36(4_194_304, 5).len(), 5);
    }
}

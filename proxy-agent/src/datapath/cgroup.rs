//! The socket hooks: cgroup v2 sock_addr programs attached at the root of
//! the cgroup hierarchy, so that every socket on the node (host network
//! processes, the agent, kubelet, every pod whatever its CNI) is load
//! balanced at connect() time.
//!
//! The links are pinned as `link_sock_<hook>` like the interface links, so
//! they stay when the agent exits. A new agent attaches its programs and
//! then renames the new pin over the old one: for a moment both programs
//! run, which is harmless (the second sees a backend address, which is
//! not a frontend, or a frontend, which has no reverse entry), and no
//! socket goes unserved. Attaching afresh also follows a changed
//! `--cgroup-root`.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use proxy_common::programs;

use super::loader::{self, Loaded};

/// Where cgroup v2 is mounted when the node has it nowhere.
pub const FALLBACK_MOUNT: &str = "/run/xdproxy/cgroupv2";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The hooks, reverse translations first: a socket is never translated
/// before the hooks that show it the frontend again are in place.
const HOOKS: [(&str, &str); 8] = [
    (programs::SOCK_RECVMSG4, "recvmsg4"),
    (programs::SOCK_RECVMSG6, "recvmsg6"),
    (programs::SOCK_GETPEERNAME4, "getpeername4"),
    (programs::SOCK_GETPEERNAME6, "getpeername6"),
    (programs::SOCK_SENDMSG4, "sendmsg4"),
    (programs::SOCK_SENDMSG6, "sendmsg6"),
    (programs::SOCK_CONNECT4, "connect4"),
    (programs::SOCK_CONNECT6, "connect6"),
];

/// The cgroup v2 directory to attach at: `wanted` (which must be one), else
/// the root of a cgroup2 mount from /proc/self/mountinfo, else a new
/// mount at `FALLBACK_MOUNT`.
pub fn root(wanted: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = wanted {
        anyhow::ensure!(
            is_cgroup2(dir),
            "--cgroup-root {} is not a cgroup v2 directory",
            dir.display()
        );
        return Ok(dir.to_path_buf());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
    if let Some(found) = cgroup2_root(&mountinfo) {
        return Ok(found);
    }
    mount_cgroup2(Path::new(FALLBACK_MOUNT))?;
    Ok(PathBuf::from(FALLBACK_MOUNT))
}

/// The mount point of a cgroup2 file system mounted from its root (a
/// mount of a sub-cgroup, as a container's own cgroup namespace shows,
/// would leave the rest of the node out).
fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn is_cgroup2(path: &Path) -> bool {
    loader::is_fs(path, CGROUP2_SUPER_MAGIC)
}

fn mount_cgroup2(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = CString::new(dir.as_os_str().as_bytes()).context("cgroup2 path")?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "no cgroup v2 mount found, and mounting one at {} failed (needs CAP_SYS_ADMIN)",
                dir.display()
            )
        });
    }
    log::info!("mounted cgroup v2 at {}", dir.display());
    Ok(())
}

impl Loaded {
    /// Attaches every socket hook at the cgroup `root` and pins the links,
    /// replacing the ones an earlier agent pinned.
    pub fn attach_socket_hooks(&mut self, root: &Path) -> anyhow::Result<()> {
        let cgroup = fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
        for (program, hook) in HOOKS {
            let path = self.pins.join(format!("link_sock_{hook}"));
            let link = self.attach_sock(program, &cgroup)?;
            // bpffs refuses names with dots; this one is not a `link_` pin, so
            // a crash between pin and rename leaves nothing that looks served.
            let fresh = self.pins.join(format!("tmp_sock_{hook}"));
            link.pin(&fresh)
                .with_context(|| format!("pinning {}", fresh.display()))?;
            // The old link, if any, loses its last reference here and detaches.
            fs::rename(&fresh, &path).with_context(|| format!("replacing {}", path.display()))?;
            self.keep_link(path);
        }
        log::info!("socket hooks attached at cgroup {}", root.display());
        Ok(())
    }

    fn attach_sock(&mut self, name: &str, cgroup: &fs::File) -> anyhow::Result<FdLink> {
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .with_context(|| format!("program {name} has an unexpected type"))?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        // A bpf_link takes no mode flags: links always run next to the
        // cgroup's other programs (systemd's, another agent's).
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name}"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link).with_context(|| format!("{name} is not a bpf_link (kernel < 5.7?)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_the_hierarchy_root() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let namespaced = "\
50 40 0:30 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup rw
51 40 0:30 / /host\\040cgroup rw - cgroup2 cgroup rw
";
        assert_eq!(
            cgroup2_root(namespaced),
            Some(PathBuf::from("/host cgroup"))
        );
        assert_eq!(cgroup2_root("41 31 0:38 / /x rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused() {
        let err = root(Some(Path::new("/proc"))).unwrap_err();
        assert!(format!("{err:#}").contains("not a cgroup v2 directory"));
    }
}

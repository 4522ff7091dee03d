//! Loading the object, pinning its maps and links under one bpffs directory,
//! and removing all of it again.
//!
//! Links are pinned, so the datapath stays in place when the agent exits
//! (connections keep flowing with the last programmed state); `cleanup`
//! removes it.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use proxy_common::{PROJECT, names, programs};

use super::iface::{Hook, IfaceSpec};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory everything is pinned under.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(PROJECT)
}

/// Mounts bpffs at `root` unless one is there already, as a DaemonSet would.
pub fn ensure_bpffs(root: &Path) -> anyhow::Result<()> {
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let target = CString::new(root.as_os_str().as_bytes()).context("bpffs path")?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("mounting bpffs at {} (needs CAP_SYS_ADMIN)", root.display())
        });
    }
    log::info!("mounted bpffs at {}", root.display());
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub pins: PathBuf,
}

/// Loads the object with every map pinned under `<bpffs>/xdproxy`. A datapath
/// left by an earlier agent is removed first.
pub fn load(bpffs: &Path, object: &[u8]) -> anyhow::Result<Loaded> {
    ensure_bpffs(bpffs)?;
    let pins = pin_dir(bpffs);
    if pins.exists() {
        log::warn!(
            "replacing the datapath pinned at {} by an earlier agent",
            pins.display()
        );
        cleanup(bpffs)?;
    }
    fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, pins.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let ebpf = loader.load(object).context("loading the eBPF object")?;
    Ok(Loaded { ebpf, pins })
}

impl Loaded {
    /// Attaches the right program to `iface` and pins the link.
    pub fn attach(&mut self, iface: &IfaceSpec) -> anyhow::Result<Hook> {
        let hook = iface.resolve()?;
        let link: FdLink = match hook {
            Hook::Xdp => self.attach_xdp(&iface.name)?,
            Hook::Tc => self.attach_tc(&iface.name)?,
        };
        let path = self.pins.join(format!("link_{hook}_{}", iface.name));
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
        log::info!("attached {hook} to {}", iface.name);
        Ok(hook)
    }

    fn attach_xdp(&mut self, iface: &str) -> anyhow::Result<FdLink> {
        let program: &mut Xdp = self.program(programs::XDP)?;
        if program.fd().is_err() {
            program.load().context("verifying the XDP program")?;
        }
        let id = program
            .attach(iface, XdpMode::default())
            .with_context(|| format!("attaching XDP to {iface}"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("XDP on {iface} is not a bpf_link (kernel < 5.9?)"))
    }

    fn attach_tc(&mut self, iface: &str) -> anyhow::Result<FdLink> {
        let program: &mut SchedClassifier = self.program(programs::TC_INGRESS)?;
        if program.fd().is_err() {
            program.load().context("verifying the TC program")?;
        }
        let id = program
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC ingress to {iface}"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("TC on {iface} is not a TCX link (kernel < 6.6?)"))
    }

    fn program<'a, T>(&'a mut self, name: &str) -> anyhow::Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?;
        program
            .try_into()
            .with_context(|| format!("program {name} has an unexpected type"))
    }
}

/// Removes every link (detaching its program) and map pinned under
/// `<bpffs>/xdproxy`, then the directory. Nothing there is not an error.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<usize> {
    let pins = pin_dir(bpffs);
    let Ok(entries) = fs::read_dir(&pins) else {
        return Ok(0);
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Links first, so no program runs against maps being removed.
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"link_"))
    });
    let mut removed = 0;
    for path in paths {
        let is_link = path
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"link_"));
        if is_link {
            unpin_link(&path)?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        removed += 1;
    }
    fs::remove_dir(&pins).with_context(|| format!("removing {}", pins.display()))?;
    Ok(removed)
}

fn unpin_link(path: &Path) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = link
        .unpin()
        .with_context(|| format!("unpinning {}", path.display()))?;
    // The kernel detaches the program when the last reference goes.
    drop(fd);
    Ok(())
}

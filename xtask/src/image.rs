//! `cargo xtask image`: the agent's container image, built offline.
//!
//! No base image: the root filesystem is staged here (the release agent at
//! /usr/bin/proxy-agent, the shared libraries `ldd` says it loads, at the
//! paths it loads them from, the CA bundle, and empty mount points) and
//! `podman build -f deploy/Containerfile` copies it into a `FROM scratch`
//! image, so no registry is needed. The tag is the agent crate's version,
//! never `latest`, so a node never runs a build it cannot name.

use std::{
    fs,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};

use crate::{
    build,
    cmd::{output_of, run},
    toolchain,
};

/// podman's name for a local image; the DaemonSet names it the same way,
/// because an image imported from `podman save` keeps it.
const REPOSITORY: &str = "localhost/xdproxy";
const BINARY: &str = "usr/bin/proxy-agent";
/// Where the runtime mounts what the agent uses (procfs, sysfs, bpffs, the
/// host's cgroup v2 under /run); a read-only image mount needs the
/// directories to exist already. /etc exists for the CA bundle.
const MOUNT_POINTS: [&str; 4] = ["proc", "sys/fs/bpf", "run", "tmp"];
/// When its configuration names no CA (a kubeconfig that trusts the
/// system's roots, or a plain-HTTP one), the kube client builds its TLS
/// setup from the system's roots (rustls-platform-verifier) and refuses to
/// start if there are none; this is the first place it looks. In-cluster,
/// with the service account's CA, it would not need it. Debian's package
/// `ca-certificates`.
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// A built image.
pub struct Image {
    pub tag: String,
    pub id: String,
    pub size: u64,
}

/// Builds the eBPF object, the release agent, the root filesystem and the
/// image; prints and returns what was built.
pub fn build() -> anyhow::Result<Image> {
    podman()?;
    let object = build::ebpf()?;
    run(build::host_cargo(&object).args(["build", "--release", "--package", "proxy-agent"]))
        .context("building the release agent for the image")?;
    let agent = build::root().join("target/release/proxy-agent");
    let dir = build::root().join("target/image");
    let _lock = lock(&dir)?;
    let rootfs = dir.join("rootfs");
    stage(&agent, &rootfs)?;
    let tag = format!("{REPOSITORY}:{}", agent_version()?);
    let image = podman_build(&rootfs, &tag)?;
    println!(
        "xtask: image {} id {} size {} bytes ({:.1} MiB)",
        image.tag,
        image.id,
        image.size,
        image.size as f64 / (1024.0 * 1024.0)
    );
    Ok(image)
}

/// Holds `dir/.lock` exclusively until dropped: two builds at once (the
/// image test while someone runs `cargo xtask image`) would stage into the
/// same tree.
fn lock(dir: &Path) -> anyhow::Result<fs::File> {
    create_dir(dir)?;
    let path = dir.join(".lock");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; the lock goes with it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}

/// The proxy-agent crate's version, as cargo resolves it (`cargo pkgid`
/// prints `path+file:///...#0.1.0` or `...#proxy-agent@0.1.0`).
fn agent_version() -> anyhow::Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let pkgid = output_of(Command::new(cargo).current_dir(build::root()).args([
        "pkgid",
        "--package",
        "proxy-agent",
    ]))?;
    let version = pkgid
        .trim()
        .rsplit(['#', '@'])
        .next()
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .with_context(|| format!("no version in `cargo pkgid` output {pkgid:?}"))?;
    Ok(version.to_string())
}

/// podman (and buildah, which it builds with) installed, and a storage
/// driver that works on this machine.
fn podman() -> anyhow::Result<()> {
    if output_of(Command::new("podman").arg("--version")).is_err() {
        toolchain::apt_install(&["podman", "buildah"])?;
    }
    if output_of(Command::new("podman").arg("info")).is_ok() {
        return Ok(());
    }
    // overlay is the default and works on most hosts; where it does not
    // (nested overlay, old kernels), vfs always does, at the cost of space.
    let conf = Path::new("/etc/containers/storage.conf");
    ensure!(
        !conf.exists(),
        "`podman info` fails with {}; fix its storage configuration",
        conf.display()
    );
    println!("xtask: podman's default storage does not work here; using the vfs driver");
    fs::write(
        conf,
        "[storage]\ndriver = \"vfs\"\nrunroot = \"/run/containers/storage\"\n\
         graphroot = \"/var/lib/containers/storage\"\n",
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    output_of(Command::new("podman").arg("info"))
        .map(|_| ())
        .context("podman does not work even with the vfs storage driver")
}

/// A fresh root filesystem at `rootfs`: the agent, its libraries, the CA
/// bundle, mount points.
fn stage(agent: &Path, rootfs: &Path) -> anyhow::Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    for dir in MOUNT_POINTS {
        create_dir(&rootfs.join(dir))?;
    }
    // Anyone may write to /tmp, as everywhere else.
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
        .context("chmod 1777 tmp")?;
    copy_binary(agent, &rootfs.join(BINARY))?;
    let bundle = Path::new("/").join(CA_BUNDLE);
    if !bundle.exists() {
        toolchain::apt_install(&["ca-certificates"])?;
    }
    copy_file(&bundle, &rootfs.join(CA_BUNDLE))?;
    for library in shared_libraries(agent)? {
        let inside = rootfs.join(library.strip_prefix("/").unwrap_or(&library));
        copy_file(&library, &inside)?;
    }
    Ok(())
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Copies the agent without its debug info (the release profile keeps line
/// tables for backtraces on the build machine; the image need not carry them).
fn copy_binary(agent: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        create_dir(dir)?;
    }
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(agent)
        .status();
    if stripped.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    println!("xtask: `strip` failed or is missing; the image keeps the debug info");
    copy_file(agent, to)
}

/// Copies the file `from` resolves to (libraries are symlinks to versioned
/// names) to `to`, creating its directory.
fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        create_dir(dir)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Every file the dynamic loader maps for `binary`: the libraries, at the
/// paths it found them, and the loader itself.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = output_of(Command::new("ldd").arg(binary))
        .with_context(|| format!("listing the libraries of {}", binary.display()))?;
    let mut libraries = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
        // "/lib64/ld-linux-x86-64.so.2 (0x...)" or "linux-vdso.so.1 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, found)) => found.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some("not") => bail!("{}: a library is missing: {line}", binary.display()),
            Some(path) if path.starts_with('/') => libraries.push(PathBuf::from(path)),
            _ => {}
        }
    }
    Ok(libraries)
}

/// `podman build` of the staged tree; an earlier image with the same tag is
/// removed once the tag has moved, so rebuilding does not pile up images.
fn podman_build(rootfs: &Path, tag: &str) -> anyhow::Result<Image> {
    let earlier = inspect(tag).ok();
    let containerfile = build::root().join("deploy/Containerfile");
    run(Command::new("podman")
        .args(["build", "--tag", tag, "--file"])
        .arg(&containerfile)
        .arg(rootfs))
    .with_context(|| format!("building {tag} from {}", containerfile.display()))?;
    let image = inspect(tag)?;
    if let Some(old) = earlier.filter(|old| old.id != image.id) {
        // Still used by a container or another tag: then it stays, which is fine.
        let _ = output_of(Command::new("podman").args(["rmi", &old.id]));
    }
    Ok(image)
}

fn inspect(tag: &str) -> anyhow::Result<Image> {
    let out = output_of(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Size}}",
        tag,
    ]))?;
    let (id, size) = out
        .trim()
        .split_once(' ')
        .with_context(|| format!("podman image inspect {tag}: {out:?}"))?;
    Ok(Image {
        tag: tag.to_string(),
        id: id.to_string(),
        size: size
            .parse()
            .with_context(|| format!("podman image inspect {tag}: size {size:?}"))?,
    })
}

//! Finding, or installing, what the eBPF build needs.
//!
//! The kernel-side crate needs a compiler that can build `core` for
//! bpfel-unknown-none (a nightly with `rust-src`, or Debian's rustc-web with
//! rust-web-src and RUSTC_BOOTSTRAP) and bpf-linker 0.13. Each step says
//! what it found or installed.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::cmd::{output_of, run};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUST: [&str; 3] = ["rustc-web", "rust-web-src", "cargo-web"];
const LLVM_DEV: [&str; 5] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];
/// Tools the tests, the benches and the demo use besides the compilers
/// (the side-by-side bench and its test load kube-proxy's rules with the
/// iptables and nftables tools).
const SYSTEM_TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("iptables-legacy-restore", "iptables"),
    ("iptables-nft-restore", "iptables"),
    ("nft", "nftables"),
];

/// How to invoke cargo for the eBPF crate.
pub struct EbpfToolchain {
    pub cargo: Command,
    pub description: String,
}

pub fn ebpf_toolchain() -> anyhow::Result<EbpfToolchain> {
    if let Some(t) = rustup_nightly() {
        return Ok(t);
    }
    if let Some(t) = debian_rust() {
        return Ok(t);
    }
    apt_install(&DEBIAN_RUST).context(
        "no Rust compiler with the std sources for bpfel-unknown-none was found; \
         install one with `rustup toolchain install nightly --component rust-src`",
    )?;
    debian_rust().context("Debian's rustc-web was installed but is not usable")
}

fn rustup_nightly() -> Option<EbpfToolchain> {
    let sysroot =
        output_of(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .ok()?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/Cargo.lock");
    if !src.exists() {
        println!("xtask: rustup nightly has no rust-src; looking further");
        return None;
    }
    let mut cargo = Command::new("rustup");
    cargo.args(["run", "nightly", "cargo"]);
    Some(EbpfToolchain {
        cargo,
        description: format!("rustup nightly with rust-src ({})", sysroot.trim()),
    })
}

fn debian_rust() -> Option<EbpfToolchain> {
    let src = Path::new("/usr/lib/rustlib/src/rust/library/Cargo.lock");
    if !(Path::new("/usr/bin/cargo").exists()
        && Path::new("/usr/bin/rustc").exists()
        && src.exists())
    {
        return None;
    }
    let version = output_of(Command::new("/usr/bin/rustc").arg("--version")).ok()?;
    let mut cargo = Command::new("/usr/bin/cargo");
    cargo
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1");
    Some(EbpfToolchain {
        cargo,
        description: format!("Debian {} with rust-web-src", version.trim()),
    })
}

/// bpf-linker 0.13 on PATH or in ~/.cargo/bin, installed if missing.
pub fn bpf_linker() -> anyhow::Result<PathBuf> {
    if let Some(found) = find_bpf_linker() {
        return Ok(found);
    }
    println!("xtask: bpf-linker {BPF_LINKER_VERSION} not found; building it (takes a few minutes)");
    let mut install = Command::new("cargo");
    install.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
    if Path::new(LLVM_PREFIX).exists() || apt_install(&LLVM_DEV).is_ok() {
        // Without LLVM_PREFIX its build script looks in /usr/lib64.
        install.env("LLVM_PREFIX", LLVM_PREFIX).args([
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
    }
    run(&mut install).context("installing bpf-linker")?;
    find_bpf_linker().context("bpf-linker was installed but is not on PATH or in ~/.cargo/bin")
}

fn find_bpf_linker() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into()))
    {
        candidates.push(Path::new(&home).join("bin/bpf-linker"));
    }
    for candidate in candidates {
        let Ok(version) = output_of(Command::new(&candidate).arg("--version")) else {
            continue;
        };
        if version.contains(BPF_LINKER_VERSION) {
            println!("xtask: found {} ({})", version.trim(), candidate.display());
            return Some(candidate);
        }
        println!(
            "xtask: {} is {}, not {BPF_LINKER_VERSION}",
            candidate.display(),
            version.trim()
        );
    }
    None
}

/// The command-line tools the tests and the demo run.
pub fn system_tools() -> anyhow::Result<()> {
    tools(&SYSTEM_TOOLS)
}

fn tools(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let names: Vec<&str> = wanted.iter().map(|(tool, _)| *tool).collect();
        println!("xtask: found {}", names.join(", "));
        return Ok(());
    }
    apt_install(&missing)
}

fn on_path(tool: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        || Path::new("/usr/sbin").join(tool).is_file()
}

pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "{} missing and this is not a Debian-like system: install them",
            packages.join(" ")
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{} missing: install them (apt-get needs root)",
            packages.join(" ")
        );
    }
    println!("xtask: installing {} with apt-get", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

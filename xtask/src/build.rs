//! Building the eBPF object and the agent that embeds it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use crate::{cmd::run, toolchain};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/proxy-ebpf")
}

/// Environment that the outer cargo sets and the eBPF build must not inherit.
const HOST_ONLY_ENV: [&str; 8] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
];

/// Builds proxy-ebpf for bpfel-unknown-none; returns the object's path.
pub fn ebpf() -> anyhow::Result<PathBuf> {
    let toolchain = toolchain::ebpf_toolchain()?;
    println!("xtask: eBPF compiler: {}", toolchain.description);
    let linker = toolchain::bpf_linker()?;
    let mut cargo = toolchain.cargo;
    let chosen: Vec<std::ffi::OsString> = cargo
        .get_envs()
        .filter(|(_, value)| value.is_some())
        .map(|(key, _)| key.to_owned())
        .collect();
    for var in HOST_ONLY_ENV
        .iter()
        .filter(|v| !chosen.iter().any(|c| c == *v))
    {
        cargo.env_remove(var);
    }
    let linker_dir = linker.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = linker_dir {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        cargo.env("PATH", std::env::join_paths(dirs).context("PATH")?);
    }
    cargo
        .current_dir(root().join("proxy-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(root().join("target/ebpf"));
    run(&mut cargo).context("building proxy-ebpf")?;
    let object = ebpf_object();
    println!("xtask: eBPF object: {}", object.display());
    Ok(object)
}

/// A host cargo command with the eBPF object to embed.
pub fn host_cargo(object: &Path) -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(root()).env("PROXY_EBPF_OBJECT", object);
    cargo
}

/// Builds the agent (debug profile, shared with the tests) and returns its path.
pub fn agent(object: &Path) -> anyhow::Result<PathBuf> {
    run(host_cargo(object).args(["build", "--package", "proxy-agent"]))?;
    Ok(root().join("target/debug/proxy-agent"))
}

/// Builds the demo's and tests' client process (`xdproxy-probe`).
pub fn probe(object: &Path) -> anyhow::Result<PathBuf> {
    run(host_cargo(object).args([
        "build",
        "--package",
        "proxy-tests",
        "--bin",
        "xdproxy-probe",
    ]))?;
    Ok(root().join("target/debug/xdproxy-probe"))
}

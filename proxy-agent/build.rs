//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built with a different toolchain (bpfel-unknown-none with
//! build-std), so it is produced by xtask, not here. Without it the agent
//! still builds (for unit tests and `plan`-like work) and says at run time
//! how to get a datapath.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/proxy-ebpf");
    let object = env::var_os("PROXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("proxy-ebpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=no eBPF object at {}: run `cargo xtask build-ebpf` (the agent cannot load a datapath without it)",
            object.display()
        );
    }
    fs::write(&out, bytes).expect("write OUT_DIR/proxy-ebpf.o");
}

//! The kernel side as the agent sees it: the embedded object, its maps, and
//! loading, pinning and attaching it. The only code that knows how map
//! entries are laid out (`keys`, `conntrack`) and how pinned maps are
//! opened and read (`pinned`, `batch`).

mod batch;
pub mod cgroup;
pub mod conntrack;
pub mod ctlines;
pub mod ctstore;
mod filter;
pub mod iface;
pub mod keys;
pub mod links;
pub mod loader;
pub mod maps;
pub mod pinned;
pub mod sockets;
pub mod stale;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// Fails with instructions when the binary was built without the object.
pub fn object() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        anyhow::bail!(
            "this proxy-agent was built without its eBPF object; build it with `cargo xtask build` \
             (or `cargo xtask build-ebpf` before `cargo build`)"
        );
    }
    Ok(OBJECT)
}

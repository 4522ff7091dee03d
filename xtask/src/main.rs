//! `cargo xtask`: everything from a fresh machine to a running datapath.

mod build;
mod cmd;
mod demo;
mod image;
mod test;
mod toolchain;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (apt packages, eBPF compiler, bpf-linker).
    Setup,
    /// Build the eBPF object (target/ebpf/...).
    BuildEbpf,
    /// Build the eBPF object and the agent that embeds it.
    Build,
    /// Without arguments: a self-contained demo in network namespaces.
    /// With `-- ARGS`: run `proxy-agent ARGS` on this machine.
    Run {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run every test (unit, BPF_PROG_TEST_RUN, network namespaces).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Datapath ns/packet against an empty XDP program.
    Bench,
    /// The container image xdproxy:VERSION (release agent, FROM scratch), with podman.
    Image,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup().map(|_| ()),
        Task::BuildEbpf => build::ebpf().map(|_| ()),
        Task::Image => image::build().map(|_| ()),
        Task::Build => build::agent(&build::ebpf()?).map(|_| ()),
        Task::Run { args } => {
            let object = setup()?;
            let agent = build::agent(&object)?;
            if args.is_empty() {
                demo::run(&agent, &build::probe(&object)?)
            } else {
                cmd::run(std::process::Command::new(agent).args(args))
            }
        }
        Task::Test { args } => {
            let object = setup()?;
            test::run(&object, &args)
        }
        Task::Bench => {
            let object = setup()?;
            cmd::run(build::host_cargo(&object).args([
                "bench",
                "--package",
                "proxy-agent",
                "--bench",
                "maglev",
            ]))?;
            // Built before the benches that start the agent: a bench binary
            // looks for it beside itself, in target/release.
            cmd::run(build::host_cargo(&object).args([
                "build",
                "--release",
                "--package",
                "proxy-agent",
            ]))?;
            let agent = build::root().join("target/release/proxy-agent");
            let bench = |name: &str| {
                cmd::run(
                    build::host_cargo(&object)
                        .env("PROXY_AGENT_BIN", &agent)
                        .args(["bench", "--package", "proxy-tests", "--bench", name]),
                )
            };
            bench("datapath")?;
            bench("sockets")?;
            bench("sidebyside")?;
            bench("control")
        }
    }
}

/// System tools, eBPF toolchain, eBPF object.
fn setup() -> anyhow::Result<std::path::PathBuf> {
    toolchain::system_tools()?;
    build::ebpf()
}

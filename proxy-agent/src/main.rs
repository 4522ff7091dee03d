use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use proxy_agent::{
    datapath::{iface::IfaceSpec, loader},
    run::{self, RunConfig},
};

/// xdproxy: a Kubernetes Service datapath on eBPF/XDP.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath and keep it programmed from Kubernetes manifests.
    ///
    /// On SIGTERM/SIGINT the agent exits and leaves the datapath in place
    /// (pinned), serving the last programmed state; `cleanup` removes it.
    Run {
        /// A YAML/JSON file or a directory of them, as `kubectl apply -f` takes.
        #[arg(long)]
        manifests: PathBuf,
        /// Interface to attach to: IF, IF:xdp or IF:tc (default: tc on veth, xdp otherwise).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<IfaceSpec>,
        /// Where bpffs is (mounted there if it is not).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// How often to check the manifests for changes, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
    },
    /// Detach every program and remove every pin the agent created.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            ifaces,
            bpffs,
            poll_ms,
        } => {
            run::run(RunConfig {
                manifests,
                ifaces,
                bpffs,
                poll: Duration::from_millis(poll_ms.max(10)),
            })
            .await
        }
        Command::Cleanup { bpffs } => {
            let removed = loader::cleanup(&bpffs)?;
            log::info!(
                "removed {removed} pins under {}",
                loader::pin_dir(&bpffs).display()
            );
            Ok(())
        }
    }
}

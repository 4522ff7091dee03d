use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use proxy_agent::{
    datapath::{iface::IfaceSpec, loader},
    node::NodeFlags,
    run::{self, RunConfig, SocketLb, Source},
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
    /// Load (or adopt) the datapath and keep it programmed from Kubernetes.
    ///
    /// Objects come from --manifests if given, else from the API server
    /// (--kubeconfig, KUBECONFIG, ~/.kube/config or the in-cluster account).
    /// On SIGTERM/SIGINT the agent exits and leaves the datapath in place
    /// (pinned), serving the last programmed state; the next `run` adopts it;
    /// `cleanup` removes it.
    Run(Box<RunArgs>),
    /// Print every frontend `run` would program from these manifests, with
    /// its backends; needs no kernel and no privileges.
    Plan {
        /// A YAML/JSON file or a directory of them, as `kubectl apply -f` takes.
        #[arg(long)]
        manifests: PathBuf,
        #[command(flatten)]
        node: NodeFlags,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach every program and remove every pin the agent created.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Print what the datapath pinned on this node holds: services,
    /// backends, conntrack or counters. Read-only; no agent has to run.
    Inspect {
        #[arg(value_enum)]
        subject: proxy_agent::inspect::Subject,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Where bpffs is mounted (the maps are under <bpffs>/xdproxy).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// A YAML/JSON file or a directory of them, as `kubectl apply -f` takes.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL, reached directly rather than through the
    /// `kubernetes` Service this agent programs (so a restarted agent or a
    /// new node never depends on itself). Overrides the kubeconfig's server;
    /// in a pod, KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT do the same.
    #[arg(long, env = "XDPROXY_KUBE_APISERVER")]
    kube_apiserver: Option<String>,
    /// Socket-level load balancing: cgroup hooks give every local socket
    /// (host network and pods) its backend at connect() time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// The cgroup v2 directory the socket hooks attach at (default: the
    /// root of the cgroup v2 mount, mounted at /run/xdproxy/cgroupv2 if
    /// there is none). Only sockets of processes in it are served.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    node: NodeFlags,
    /// Interfaces to attach to: a name, a glob (`veth*`, `eth?`) or `auto`
    /// (those of the default routes), each optionally with :xdp or :tc
    /// (default: tc on veth, bridge, tun, dummy, xdp otherwise). Followed as
    /// interfaces come and go; the first spec that matches one decides.
    #[arg(long = "iface", default_value = "auto")]
    ifaces: Vec<IfaceSpec>,
    /// Where bpffs is (mounted there if it is not).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// How often to check the manifests for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// /healthz, /livez and /readyz, as kube-proxy's.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// /metrics, as kube-proxy's.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// /healthz fails when a change has waited longer than this to be programmed (seconds).
    #[arg(long, default_value_t = 60)]
    healthz_timeout_s: u64,
    #[command(flatten)]
    conntrack: proxy_agent::conntrack::Flags,
    #[command(flatten)]
    node_config: proxy_agent::nodeconfig::Flags,
}

impl RunArgs {
    fn config(self) -> anyhow::Result<RunConfig> {
        let source = match self.manifests {
            Some(path) => Source::Manifests(path),
            None => Source::Kubernetes {
                kubeconfig: self.kubeconfig,
                apiserver: self.kube_apiserver,
            },
        };
        let node_name = match self.node.node_name.clone() {
            Some(name) => name,
            None => hostname()?,
        };
        Ok(RunConfig {
            source,
            node: self.node.this_node(Some(node_name.clone())),
            node_name,
            slot_budget: self.node.balancing.slot_budget,
            ifaces: self.ifaces,
            socket_lb: self.socket_lb.then_some(SocketLb {
                cgroup_root: self.cgroup_root,
            }),
            bpffs: self.bpffs,
            poll: Duration::from_millis(self.poll_ms.max(10)),
            health_addr: self.healthz_bind_address,
            metrics_addr: self.metrics_bind_address,
            health_timeout: Duration::from_secs(self.healthz_timeout_s),
            conntrack: self.conntrack.config(),
            node_config: self.node_config,
        })
    }
}

fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        anyhow::bail!(
            "no --node-name, no NODE_NAME and no hostname: {}",
            std::io::Error::last_os_error()
        );
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn main() -> anyhow::Result<()> {
    one_heap();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(agent())
}

/// glibc gives each thread that meets contention its own arena, and a
/// freed block returns only to its arena: at 10k Services the runtime's
/// threads left 12 MiB of peak RSS in half-empty arenas (control bench,
/// 118 MiB with glibc's default, 106 MiB with one). The agent allocates
/// in bursts from one task at a time, so one arena costs it no waiting.
/// Set before the runtime starts any thread.
fn one_heap() {
    // SAFETY: mallopt only sets a malloc tunable; no thread exists yet.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        eprintln!("warning: glibc refused M_ARENA_MAX=1; memory use may be higher");
    }
}

async fn agent() -> anyhow::Result<()> {
    // Milliseconds: start-up and sync times are read off the log.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match Cli::parse().command {
        Command::Run(args) => run::run(args.config()?).await,
        Command::Plan {
            manifests,
            output,
            node,
        } => {
            let plan = proxy_agent::plan::from_manifests(
                &manifests,
                node.this_node(node.node_name.clone()),
                node.balancing.slot_budget,
            );
            for error in &plan.errors {
                eprintln!("error: {error}");
            }
            for warning in &plan.warnings {
                eprintln!("warning: {warning}");
            }
            let text = match output {
                Output::Table => plan.table(),
                Output::Json => serde_json::to_string_pretty(&plan)? + "\n",
            };
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            if !plan.errors.is_empty() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            let removed = loader::cleanup(&bpffs)?;
            log::info!(
                "removed {removed} pins under {}",
                loader::pin_dir(&bpffs).display()
            );
            Ok(())
        }
        Command::Inspect {
            subject,
            output,
            bpffs,
        } => {
            use proxy_agent::inspect::{self, Format};
            let format = match output {
                Output::Table => Format::Table,
                Output::Json => Format::Json,
            };
            let text = inspect::inspect(&bpffs, subject, format)?;
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(())
        }
    }
}

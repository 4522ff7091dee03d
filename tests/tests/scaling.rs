//! Backend churn under real traffic: long-lived TCP connections and UDP
//! streams through the cluster IP while the Service's EndpointSlice shrinks,
//! grows back and marks endpoints terminating.
//!
//! client (10.0.1.2) --cl0 (TC)--> node --be{i}--> backend i (10.1.{i+1}.2)
//!
//! Every TCP connection sends `GET /` every 100 ms and records which backend
//! answered; every UDP stream (one socket, so one flow) sends a numbered
//! datagram every 50 ms and records the answering backend and the time. The
//! servers in removed backends keep running: whatever the client sees after
//! a change is the datapath's doing, not a dead server's.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proxy_common::Counter;
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, new_connections, new_udp_flows},
    manifests::{self, HTTP_PORT, ManifestFile, UDP_PORT, VIP},
    netns::unique_prefix,
    servers::Servers,
    topology::{Topology, backend_addr},
};

const BACKENDS: usize = 10;
const TCP_STREAMS: usize = 20;
const UDP_STREAMS: usize = 10;
/// How often a long-lived TCP connection asks for its backend's name.
const TCP_EVERY: Duration = Duration::from_millis(100);
/// How often a UDP stream sends a datagram.
const UDP_EVERY: Duration = Duration::from_millis(50);
/// After the stop, how long a UDP stream still waits for late answers.
const UDP_DRAIN: Duration = Duration::from_millis(300);
/// Connect timeout (SYN retransmits come at 1 s and 3 s; reads are bounded
/// at 2 s by `HttpConn`, so a hanging connection is an error, not a hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The one timed requirement: a UDP stream whose backend was removed is
/// answered by a live backend within this.
const RESTEER_LIMIT: Duration = Duration::from_secs(1);
/// How long traffic runs after each change before the next step. Not an
/// assertion: a connection is exercised every 100 ms, so this lets each of
/// them meet the change several times.
const SETTLE: Duration = Duration::from_millis(1000);

fn http_vip() -> SocketAddr {
    SocketAddrV4::new(VIP, HTTP_PORT).into()
}

fn udp_vip() -> SocketAddr {
    SocketAddrV4::new(VIP, UDP_PORT).into()
}

fn name(i: usize) -> String {
    format!("backend{i}")
}

fn names(list: &BTreeSet<usize>) -> BTreeSet<String> {
    list.iter().copied().map(name).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When a manifest change was written and when the agent's log showed it
/// applied (polled every 20 ms, so at most that much after the fact).
#[derive(Clone, Copy, Debug)]
struct Change {
    written: Instant,
    synced: Instant,
}

/// Ten backends with servers, the agent on the node with TC on `cl0`.
/// Fields drop in order: the agent (it cleans its pins), the servers, the
/// namespaces, the manifest directory.
struct Lab {
    agent: Agent,
    _servers: Vec<Servers>,
    topology: Topology,
    manifest: ManifestFile,
}

impl Lab {
    fn start(tag: &str) -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix(tag), BACKENDS)?;
        // As e2e does by default: the node finishes checksums on egress, so
        // the receivers verify what the datapath wrote.
        topology.finish_checksums_on_node_egress()?;
        let servers = topology.start_servers()?;
        let manifest = ManifestFile::new(
            &format!("scaling-{}", topology.prefix()),
            &manifests::web(&all()),
        )?;
        let ifaces = topology.agent_ifaces("");
        let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
        Ok(Lab {
            agent,
            _servers: servers,
            topology,
            manifest,
        })
    }

    /// Rewrites the manifest and waits until the agent has applied it.
    fn update(&mut self, text: &str) -> anyhow::Result<Change> {
        let syncs = self.agent.log().matches("synced:").count();
        self.manifest.write(text)?;
        let written = Instant::now();
        self.agent
            .wait_for_syncs(syncs + 1, Duration::from_secs(10))?;
        Ok(Change {
            written,
            synced: Instant::now(),
        })
    }

    fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        self.agent.counters()
    }

    /// `n` new connections, one request each: how many each backend served.
    fn short_tcp(&self, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        new_connections(&self.topology.client, http_vip(), n, CONNECT_TIMEOUT)
    }

    /// `n` new UDP flows (a fresh socket each), one exchange each.
    fn short_udp(&self, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        new_udp_flows(&self.topology.client, udp_vip(), n, Duration::from_secs(2))
    }
}

fn all() -> Vec<usize> {
    (0..BACKENDS).collect()
}

fn counter(counters: &BTreeMap<String, u64>, c: Counter) -> u64 {
    counters.get(c.name()).copied().unwrap_or(0)
}

/// The counters that differ between two readings, for failure messages.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let changed: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let was = before.get(k).copied().unwrap_or(0);
            (*v != was).then(|| format!("{k} +{}", v.wrapping_sub(was)))
        })
        .collect();
    format!("counter changes: [{}]", changed.join(", "))
}

/// What went wrong on a long-lived TCP connection (it stops there).
#[derive(Clone, Debug)]
struct TcpError {
    at: Instant,
    kind: Option<ErrorKind>,
    text: String,
}

#[derive(Clone, Debug)]
struct TcpLog {
    local: SocketAddr,
    /// The backend of the connection's first request.
    first: String,
    answers: Vec<(Instant, String)>,
    error: Option<TcpError>,
}

#[derive(Clone, Debug)]
struct UdpReply {
    seq: usize,
    at: Instant,
    backend: String,
    from: SocketAddr,
}

#[derive(Clone, Debug, Default)]
struct UdpLog {
    local: Option<SocketAddr>,
    /// Send time of each datagram, by sequence number.
    sent: Vec<Instant>,
    /// Replies in arrival order.
    replies: Vec<UdpReply>,
    errors: Vec<String>,
}

impl UdpLog {
    /// The stream's local port, for messages.
    fn port(&self) -> String {
        self.local
            .map_or_else(|| "?".into(), |a| a.port().to_string())
    }

    fn first(&self) -> &str {
        self.replies.first().map_or("", |r| r.backend.as_str())
    }

    /// Datagrams never answered.
    fn lost(&self) -> usize {
        let answered: BTreeSet<usize> = self.replies.iter().map(|r| r.seq).collect();
        self.sent.len() - answered.len()
    }

    /// The backends in the order the stream met them, each once per run.
    fn runs(&self) -> Vec<String> {
        let mut runs: Vec<String> = Vec::new();
        for r in &self.replies {
            if runs.last() != Some(&r.backend) {
                runs.push(r.backend.clone());
            }
        }
        runs
    }
}

/// The first io::Error in an error's chain, by kind.
fn io_kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
}

fn tcp_worker(mut conn: HttpConn, log: Arc<Mutex<TcpLog>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let result = conn.get();
        let at = Instant::now();
        match result {
            Ok(backend) => lock(&log).answers.push((at, backend)),
            Err(e) => {
                lock(&log).error = Some(TcpError {
                    at,
                    kind: io_kind(&e),
                    text: format!("{e:#}"),
                });
                return;
            }
        }
        thread::sleep(TCP_EVERY);
    }
}

fn udp_worker(id: usize, socket: UdpSocket, log: Arc<Mutex<UdpLog>>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    let mut next = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let tag = format!(":u{id}-");
    loop {
        let now = Instant::now();
        if drain_until.is_none() && stop.load(Ordering::SeqCst) {
            drain_until = Some(now + UDP_DRAIN);
        }
        if drain_until.is_some_and(|end| now >= end) {
            return;
        }
        if drain_until.is_none() && now >= next {
            let mut log = lock(&log);
            let seq = log.sent.len();
            let payload = format!("u{id}-{seq}");
            if let Err(e) = socket.send_to(payload.as_bytes(), udp_vip()) {
                log.errors.push(format!("sending {payload}: {e}"));
            }
            log.sent.push(now);
            next = (next + UDP_EVERY).max(now);
            continue;
        }
        let until = drain_until.unwrap_or(next);
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        if let Err(e) = socket.set_read_timeout(Some(wait)) {
            lock(&log).errors.push(format!("read timeout: {e}"));
            return;
        }
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let parsed = text.split_once(&tag).and_then(|(backend, seq)| {
                    Some((backend.to_string(), seq.parse::<usize>().ok()?))
                });
                let mut log = lock(&log);
                match parsed {
                    Some((backend, seq)) if seq < log.sent.len() => log.replies.push(UdpReply {
                        seq,
                        at,
                        backend,
                        from,
                    }),
                    _ => log
                        .errors
                        .push(format!("unexpected reply {text:?} from {from}")),
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => lock(&log).errors.push(format!("receiving: {e}")),
        }
    }
}

/// The long-lived connections and streams, each on its own thread until
/// `finish` (or drop, on a failure) stops them. Every read is bounded, so
/// stopping never waits long.
struct Streams {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tcp: Vec<Arc<Mutex<TcpLog>>>,
    udp: Vec<Arc<Mutex<UdpLog>>>,
}

impl Streams {
    fn start(lab: &Lab) -> anyhow::Result<Streams> {
        let mut streams = Streams {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            tcp: Vec::new(),
            udp: Vec::new(),
        };
        let client = &lab.topology.client;
        for i in 0..TCP_STREAMS {
            let mut conn = HttpConn::connect(client, http_vip(), CONNECT_TIMEOUT)?;
            let first = conn
                .get()
                .with_context(|| format!("first request of connection {i}"))?;
            let log = Arc::new(Mutex::new(TcpLog {
                local: conn.local(),
                first,
                answers: Vec::new(),
                error: None,
            }));
            streams.tcp.push(log.clone());
            let stop = streams.stop.clone();
            streams.threads.push(
                thread::Builder::new()
                    .name(format!("tcp{i}"))
                    .spawn(move || tcp_worker(conn, log, stop))?,
            );
        }
        for i in 0..UDP_STREAMS {
            let socket = client.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
            let log = Arc::new(Mutex::new(UdpLog {
                local: socket.local_addr().ok(),
                ..UdpLog::default()
            }));
            streams.udp.push(log.clone());
            let stop = streams.stop.clone();
            streams.threads.push(
                thread::Builder::new()
                    .name(format!("udp{i}"))
                    .spawn(move || udp_worker(i, socket, log, stop))?,
            );
        }
        // Every stream has its backend before anything changes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while streams.udp().iter().any(|u| u.replies.is_empty()) {
            if Instant::now() > deadline {
                bail!("UDP streams without an answer: {:?}", streams.udp());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(streams)
    }

    fn tcp(&self) -> Vec<TcpLog> {
        self.tcp.iter().map(|l| lock(l).clone()).collect()
    }

    fn udp(&self) -> Vec<UdpLog> {
        self.udp.iter().map(|l| lock(l).clone()).collect()
    }

    /// The backend each TCP connection and UDP stream started on.
    fn backends(&self) -> (Vec<String>, Vec<String>) {
        let tcp = self.tcp().into_iter().map(|t| t.first).collect();
        let udp = self.udp().iter().map(|u| u.first().to_string()).collect();
        (tcp, udp)
    }

    /// Stops every thread and returns what each saw.
    fn finish(mut self) -> (Vec<TcpLog>, Vec<UdpLog>) {
        self.join();
        (self.tcp(), self.udp())
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.join();
    }
}

fn count_on(backends: &[String], set: &BTreeSet<usize>) -> usize {
    let set = names(set);
    backends.iter().filter(|b| set.contains(*b)).count()
}

/// The 3 backends to keep: both the kept and the removed ones must carry at
/// least one TCP connection and one UDP stream, or the test proves nothing;
/// among those, the choice keeping the most TCP connections.
fn choose_kept(tcp: &[String], udp: &[String]) -> anyhow::Result<BTreeSet<usize>> {
    let mut best: Option<(usize, BTreeSet<usize>)> = None;
    for a in 0..BACKENDS {
        for b in a + 1..BACKENDS {
            for c in b + 1..BACKENDS {
                let kept = BTreeSet::from([a, b, c]);
                let (kt, ku) = (count_on(tcp, &kept), count_on(udp, &kept));
                let useful = kt > 0 && ku > 0 && kt < tcp.len() && ku < udp.len();
                if useful && best.as_ref().is_none_or(|(n, _)| kt > *n) {
                    best = Some((kt, kept));
                }
            }
        }
    }
    best.map(|(_, kept)| kept).with_context(|| {
        format!("flows did not spread over the backends: TCP {tcp:?}, UDP {udp:?}")
    })
}

/// The 2 backends to mark terminating: between them at least one TCP
/// connection and one UDP stream; among those, the pair carrying the most.
fn choose_terminating(tcp: &[String], udp: &[String]) -> anyhow::Result<BTreeSet<usize>> {
    let mut best: Option<(usize, BTreeSet<usize>)> = None;
    for a in 0..BACKENDS {
        for b in a + 1..BACKENDS {
            let pair = BTreeSet::from([a, b]);
            let (t, u) = (count_on(tcp, &pair), count_on(udp, &pair));
            if t > 0 && u > 0 && best.as_ref().is_none_or(|(n, _)| t + u > *n) {
                best = Some((t + u, pair));
            }
        }
    }
    best.map(|(_, pair)| pair).with_context(|| {
        format!("no two backends carry both TCP and UDP flows: TCP {tcp:?}, UDP {udp:?}")
    })
}

/// All backends in the slice, those in `terminating` with the conditions of
/// a Pod being deleted: `ready: false, serving: true, terminating: true`.
fn with_terminating(terminating: &BTreeSet<usize>) -> anyhow::Result<String> {
    let mut text = manifests::web(&all());
    for i in terminating {
        let ready = format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
            backend_addr(*i)
        );
        let draining = format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: false, serving: true, terminating: true}}\n",
            backend_addr(*i)
        );
        ensure!(text.contains(&ready), "no endpoint {ready:?} in {text}");
        text = text.replace(&ready, &draining);
    }
    Ok(text)
}

/// Milliseconds from `zero`, for timelines in messages.
fn ms(zero: Instant, at: Instant) -> i128 {
    if at >= zero {
        at.duration_since(zero).as_millis() as i128
    } else {
        -(zero.duration_since(at).as_millis() as i128)
    }
}

/// 10 -> 3 -> 10 endpoints under traffic.
///
/// Scaling down: connections whose backend stayed keep it without an error;
/// those whose backend left are reset by the datapath (the client reads
/// ECONNRESET, the `reset` counter counts them) during that step, none
/// hangs; UDP streams whose backend left are answered by one of the 3
/// remaining within 1 s; those whose backend stayed keep it and lose at most
/// one datagram. New connections go only to the 3.
///
/// Scaling back up: nobody moves again (each connection and stream ends on
/// the backend it had after the scale-down), and 200 new connections reach
/// all 10 backends.
#[test]
fn scaling_down_resets_or_moves_the_removed_backends_flows_and_scaling_up_moves_nobody()
-> anyhow::Result<()> {
    if !common::ready(
        "scaling_down_resets_or_moves_the_removed_backends_flows_and_scaling_up_moves_nobody",
    ) {
        return Ok(());
    }
    let mut lab = Lab::start("scl")?;
    let streams = Streams::start(&lab)?;
    let zero = Instant::now();
    thread::sleep(SETTLE / 2);

    let (tcp_first, udp_first) = streams.backends();
    let kept = choose_kept(&tcp_first, &udp_first)?;
    let kept_names = names(&kept);
    let before = lab.counters()?;
    let down = lab.update(&manifests::web(&kept.iter().copied().collect::<Vec<_>>()))?;
    thread::sleep(SETTLE);
    let fresh = lab.short_tcp(50)?;
    let after_down = lab.counters()?;

    let up = lab.update(&manifests::web(&all()))?;
    thread::sleep(SETTLE / 2);
    let spread = lab.short_tcp(200)?;
    thread::sleep(SETTLE / 2);
    let (tcp, udp) = streams.finish();
    let end = lab.counters()?;

    let mut problems = Vec::new();
    let context = format!(
        "kept {kept:?}; scale-down written at {} ms, applied by {} ms; scale-up written at {} ms; {}",
        ms(zero, down.written),
        ms(zero, down.synced),
        ms(zero, up.written),
        delta(&before, &end)
    );

    // New connections after the scale-down: only the 3.
    if !fresh.keys().all(|b| kept_names.contains(b)) {
        problems.push(format!(
            "new connections after the scale-down reached removed backends: {fresh:?}"
        ));
    }
    // New connections after the scale-up: all 10 (any imbalance allowed).
    let reached: BTreeSet<String> = spread.keys().cloned().collect();
    if reached != names(&(0..BACKENDS).collect()) {
        problems.push(format!(
            "200 new connections after the scale-up did not reach every backend: {spread:?}"
        ));
    }

    let mut reset = 0;
    for t in &tcp {
        let who = format!("TCP {} (on {})", t.local, t.first);
        if let Some((at, moved)) = t.answers.iter().find(|(_, b)| *b != t.first) {
            problems.push(format!("{who} answered by {moved} at {} ms", ms(zero, *at)));
        }
        if kept_names.contains(&t.first) {
            if let Some(e) = &t.error {
                problems.push(format!(
                    "{who}: its backend stayed, yet at {} ms: {}",
                    ms(zero, e.at),
                    e.text
                ));
            } else if t.answers.last().is_none_or(|(at, _)| *at < up.synced) {
                problems.push(format!(
                    "{who} was not exercised after the scale-up (last answer {:?} ms)",
                    t.answers.last().map(|(at, _)| ms(zero, *at))
                ));
            }
            continue;
        }
        match &t.error {
            None => problems.push(format!(
                "{who}: its backend was removed, yet the connection never failed ({} answers, last at {:?} ms)",
                t.answers.len(),
                t.answers.last().map(|(at, _)| ms(zero, *at))
            )),
            Some(e) if e.kind != Some(ErrorKind::ConnectionReset) => problems.push(format!(
                "{who}: its backend was removed; expected ECONNRESET, got at {} ms: {} (a timeout means the connection hung)",
                ms(zero, e.at),
                e.text
            )),
            Some(e) if e.at < down.written || e.at > up.written => problems.push(format!(
                "{who} was reset at {} ms, outside the scale-down step",
                ms(zero, e.at)
            )),
            Some(_) => reset += 1,
        }
    }
    let resets =
        counter(&after_down, Counter::Reset).saturating_sub(counter(&before, Counter::Reset));
    if resets < reset as u64 {
        problems.push(format!(
            "{reset} connections saw ECONNRESET but the datapath's `reset` counter rose by {resets} (another RST source?)"
        ));
    }
    let failed =
        counter(&end, Counter::ResetFailed).saturating_sub(counter(&before, Counter::ResetFailed));
    if failed != 0 {
        problems.push(format!("reset_failed rose by {failed}"));
    }

    let mut resteered = Vec::new();
    for u in &udp {
        let who = format!("UDP stream {} (on {})", u.port(), u.first());
        if !u.errors.is_empty() {
            problems.push(format!("{who}: {:?}", u.errors));
        }
        if let Some(r) = u.replies.iter().find(|r| r.from != udp_vip()) {
            problems.push(format!(
                "{who}: datagram {} answered from {} by {}",
                r.seq, r.from, r.backend
            ));
        }
        if u.replies.last().is_none_or(|r| r.at < up.synced) {
            problems.push(format!("{who} was not answered after the scale-up"));
        }
        let runs = u.runs();
        if kept_names.contains(u.first()) {
            if runs.len() != 1 {
                problems.push(format!("{who}: its backend stayed, yet it went {runs:?}"));
            }
            if u.lost() > 1 {
                problems.push(format!(
                    "{who}: its backend stayed, yet {} of {} datagrams went unanswered",
                    u.lost(),
                    u.sent.len()
                ));
            }
            continue;
        }
        if runs.len() != 2 || !kept_names.contains(&runs[1]) {
            problems.push(format!(
                "{who}: its backend was removed; expected it to move once, to one of {kept_names:?}, and stay; it went {runs:?}"
            ));
            continue;
        }
        let last_old = u.replies.iter().rfind(|r| r.backend == runs[0]);
        let first_new = u.replies.iter().find(|r| r.backend == runs[1]);
        let (Some(last_old), Some(first_new)) = (last_old, first_new) else {
            continue;
        };
        let since_write = first_new.at.saturating_duration_since(down.written);
        let gap = first_new.at.saturating_duration_since(last_old.at);
        if first_new.at < down.written || since_write >= RESTEER_LIMIT || gap >= RESTEER_LIMIT {
            problems.push(format!(
                "{who}: first answer from {} at {} ms, {since_write:?} after the scale-down manifest was written \
                 (this includes the agent's 50 ms poll and its sync; the log showed the sync at {} ms) and {gap:?} \
                 after the last answer from {} (at {} ms); both must be under {RESTEER_LIMIT:?}",
                runs[1],
                ms(zero, first_new.at),
                ms(zero, down.synced),
                runs[0],
                ms(zero, last_old.at)
            ));
        }
        resteered.push((since_write, gap, u.lost()));
    }

    assert!(problems.is_empty(), "{}\n{context}", problems.join("\n"));
    println!(
        "scaling: kept {kept:?}; {reset} of {} TCP connections reset (counter +{resets}); \
         scale-down applied {:?} after the write; UDP re-steered (since write, outage, lost): {resteered:?}; \
         new after scale-down {fresh:?}; after scale-up {spread:?}",
        tcp.len(),
        down.synced - down.written
    );
    Ok(())
}

/// Two endpoints become `terminating: true, ready: false, serving: true`
/// while flows are open on them: those flows (TCP and UDP) go on with their
/// backends undisturbed, every other flow too, and no new connection or UDP
/// flow reaches a terminating backend.
#[test]
fn terminating_endpoints_keep_their_flows_and_get_no_new_ones() -> anyhow::Result<()> {
    if !common::ready("terminating_endpoints_keep_their_flows_and_get_no_new_ones") {
        return Ok(());
    }
    let mut lab = Lab::start("trm")?;
    let streams = Streams::start(&lab)?;
    let zero = Instant::now();
    thread::sleep(SETTLE / 2);

    let (tcp_first, udp_first) = streams.backends();
    let terminating = choose_terminating(&tcp_first, &udp_first)?;
    let draining = names(&terminating);
    let before = lab.counters()?;
    let change = lab.update(&with_terminating(&terminating)?)?;
    thread::sleep(SETTLE / 2);
    let fresh_tcp = lab.short_tcp(100)?;
    let fresh_udp = lab.short_udp(50)?;
    thread::sleep(SETTLE / 2);
    let (tcp, udp) = streams.finish();
    let end = lab.counters()?;

    let mut problems = Vec::new();
    let context = format!(
        "terminating {terminating:?}; change written at {} ms, applied by {} ms; {}",
        ms(zero, change.written),
        ms(zero, change.synced),
        delta(&before, &end)
    );
    for (what, counts) in [("TCP connections", &fresh_tcp), ("UDP flows", &fresh_udp)] {
        if counts.keys().any(|b| draining.contains(b)) {
            problems.push(format!(
                "new {what} reached a terminating backend: {counts:?}"
            ));
        }
    }
    let (mut on_tcp, mut on_udp) = (0, 0);
    for t in &tcp {
        let who = format!("TCP {} (on {})", t.local, t.first);
        if let Some(e) = &t.error {
            problems.push(format!("{who} at {} ms: {}", ms(zero, e.at), e.text));
        }
        if let Some((at, moved)) = t.answers.iter().find(|(_, b)| *b != t.first) {
            problems.push(format!("{who} answered by {moved} at {} ms", ms(zero, *at)));
        }
        if t.error.is_none() && t.answers.last().is_none_or(|(at, _)| *at < change.synced) {
            problems.push(format!("{who} was not exercised after the change"));
        }
        on_tcp += usize::from(draining.contains(&t.first));
    }
    for u in &udp {
        let who = format!("UDP stream {} (on {})", u.port(), u.first());
        if !u.errors.is_empty() {
            problems.push(format!("{who}: {:?}", u.errors));
        }
        let runs = u.runs();
        if runs.len() != 1 {
            problems.push(format!("{who} went {runs:?}"));
        }
        if u.lost() > 1 {
            problems.push(format!(
                "{who}: {} of {} datagrams went unanswered",
                u.lost(),
                u.sent.len()
            ));
        }
        if u.replies.last().is_none_or(|r| r.at < change.synced) {
            problems.push(format!("{who} was not answered after the change"));
        }
        on_udp += usize::from(draining.contains(u.first()));
    }
    let resets = counter(&end, Counter::Reset).saturating_sub(counter(&before, Counter::Reset));
    if resets != 0 {
        problems.push(format!(
            "the datapath reset {resets} connections (terminating backends' flows must stay)"
        ));
    }

    assert!(problems.is_empty(), "{}\n{context}", problems.join("\n"));
    println!(
        "terminating {terminating:?}: {on_tcp} TCP connections and {on_udp} UDP streams kept on them; \
         new TCP {fresh_tcp:?}; new UDP {fresh_udp:?}"
    );
    Ok(())
}

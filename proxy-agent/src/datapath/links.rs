//! Interfaces that come and go: which links `--iface` selects, kept up to
//! date from rtnetlink, and the attaching and detaching that follows.
//!
//! The watcher subscribes to link notifications (and route notifications
//! for `auto`) before it dumps links and routes, so nothing that happens
//! between the dump and the first notification is missed: both arrive on one
//! socket in the order the kernel produced them, and applying each in turn
//! leaves the last word. A notification overrun (ENOBUFS) starts over with a
//! new socket and fresh dumps. Routes are not followed message by message
//! (IPv6 multipath siblings and routes flushed with their link without a
//! notification make that fragile): any change that can touch a default
//! route dumps the routes again.
//!
//! Matching and the attach/detach decisions are pure ([`desired`],
//! [`Attachments::apply`] over the [`Hooks`] trait) and tested without a
//! kernel; [`Watcher`] does the I/O.

mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    time::Duration,
};

use anyhow::Context;

use super::{
    iface::{Hook, IfaceSpec, Pattern},
    loader::Loaded,
};
use crate::metrics::Shared;
use netlink::{Body, Dump, LinkMsg, Message, RouteMsg, Socket};

/// A link as the matcher needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// IFLA_INFO_KIND; None for physical NICs.
    pub kind: Option<String>,
    pub up: bool,
    pub loopback: bool,
}

/// The links of the namespace and where its default routes go out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkTable {
    pub links: BTreeMap<u32, Link>,
    /// Interfaces of the main table's default routes, both families.
    pub default_oifs: BTreeSet<u32>,
}

/// What an interface should have: its ingress hook (and TC egress).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub hook: Hook,
}

impl IfaceSpec {
    /// True if this spec selects the link `index` of `table`.
    fn selects(&self, index: u32, link: &Link, table: &LinkTable) -> bool {
        match &self.pattern {
            Pattern::Auto => table.default_oifs.contains(&index),
            glob => glob.matches_name(&link.name),
        }
    }
}

/// Each link's wanted hooks: the first spec that selects it decides
/// (so `eth0:xdp` before `eth*` gives eth0 XDP). Loopback never has any.
pub fn desired(specs: &[IfaceSpec], table: &LinkTable) -> BTreeMap<u32, Want> {
    let mut want = BTreeMap::new();
    for (&index, link) in &table.links {
        if link.loopback {
            continue;
        }
        if let Some(spec) = specs.iter().find(|s| s.selects(index, link, table)) {
            let hook = spec
                .hook
                .unwrap_or_else(|| Hook::for_kind(link.kind.as_deref()));
            let name = link.name.clone();
            want.insert(index, Want { name, hook });
        }
    }
    want
}

/// The specs that select no link of `table`.
pub fn unmatched<'a>(specs: &'a [IfaceSpec], table: &LinkTable) -> Vec<&'a IfaceSpec> {
    specs
        .iter()
        .filter(|s| {
            !table
                .links
                .iter()
                .any(|(&i, l)| !l.loopback && s.selects(i, l, table))
        })
        .collect()
}

/// What attaching and detaching does to the kernel (the loader's pinned
/// links in the agent; a recording fake in tests).
pub trait Hooks {
    /// Attaches `hook` at ingress and TC at egress, or swaps this agent's
    /// programs into links pinned for `name` already.
    fn attach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()>;
    /// Unpins (so detaches) the links of `name` for `hook`.
    fn detach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()>;
    /// Moves the pins of a renamed interface; the links stay attached.
    fn rename(&mut self, from: &str, to: &str, hook: Hook) -> anyhow::Result<()>;
}

/// The agent's hooks: links pinned under `<bpffs>/xdproxy`.
impl Hooks for Loaded {
    fn attach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()> {
        Loaded::attach(self, name, hook)
    }

    fn detach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()> {
        Loaded::detach(self, name, hook)
    }

    fn rename(&mut self, from: &str, to: &str, hook: Hook) -> anyhow::Result<()> {
        Loaded::rename(self, from, to, hook)
    }
}

/// One attached interface: what it has, and whether attaching it worked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attached {
    want: Want,
    ok: bool,
}

/// What this agent has attached, by interface index.
#[derive(Debug, Default)]
pub struct Attachments {
    attached: BTreeMap<u32, Attached>,
}

impl Attachments {
    /// Interfaces whose attaching worked.
    pub fn count(&self) -> usize {
        self.attached.values().filter(|a| a.ok).count()
    }

    /// Makes what is attached what `want` says: detaches (or renames) first,
    /// so a name that moved to another interface is free, then attaches.
    /// A failure is logged and leaves the others alone; a failed interface
    /// is tried again when it is in `touched` (it had an event).
    pub fn apply(
        &mut self,
        want: &BTreeMap<u32, Want>,
        table: &LinkTable,
        touched: &BTreeSet<u32>,
        hooks: &mut impl Hooks,
    ) {
        let stale: Vec<u32> = self
            .attached
            .iter()
            .filter(|(i, a)| want.get(i) != Some(&a.want))
            .map(|(i, _)| *i)
            .collect();
        for index in stale {
            self.retire(index, want.get(&index), table, hooks);
        }
        for (index, w) in want {
            let retry = self
                .attached
                .get(index)
                .is_some_and(|a| !a.ok && touched.contains(index));
            if retry || !self.attached.contains_key(index) {
                self.attach(*index, w, hooks);
            }
        }
    }

    /// Handles an attached interface that went, stopped matching, or is to
    /// have something else: renames its pins when only its name changed.
    fn retire(
        &mut self,
        index: u32,
        want: Option<&Want>,
        table: &LinkTable,
        hooks: &mut impl Hooks,
    ) {
        let Some(old) = self.attached.remove(&index) else {
            return;
        };
        let old = old.want;
        if let Some(new) = want.filter(|w| w.hook == old.hook) {
            match hooks.rename(&old.name, &new.name, old.hook) {
                Ok(()) => {
                    log::info!("{} was renamed {}: its links follow", old.name, new.name);
                    let (want, ok) = (new.clone(), true);
                    self.attached.insert(index, Attached { want, ok });
                    return;
                }
                Err(e) => log::warn!("{e:#}; attaching {} afresh", new.name),
            }
        }
        let why = match (want, table.links.get(&index)) {
            (Some(_), _) => "it is to have another hook",
            (None, Some(_)) => "it no longer matches any --iface",
            (None, None) => "the interface is gone",
        };
        match hooks.detach(&old.name, old.hook) {
            Ok(()) => log::info!("detached {} from {}: {why}", old.hook, old.name),
            Err(e) => log::error!("detaching {} from {}: {e:#}", old.hook, old.name),
        }
    }

    fn attach(&mut self, index: u32, want: &Want, hooks: &mut impl Hooks) {
        let ok = match hooks.attach(&want.name, want.hook) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "attaching {} to {}: {e:#}; tried again at its next event",
                    want.hook,
                    want.name
                );
                false
            }
        };
        let want = want.clone();
        self.attached.insert(index, Attached { want, ok });
    }
}

/// How far the watcher's view of the kernel is.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for this dump; `interrupted` if the kernel said it changed
    /// while dumping (then it is asked for again).
    Dumping {
        what: Dump,
        seq: u32,
        interrupted: bool,
    },
    /// Every dump done; notifications keep the table current.
    Current,
}

/// The kernel's links and default routes as one socket tells them.
struct View {
    socket: Socket,
    table: LinkTable,
    phase: Phase,
    /// Default route interfaces seen so far by the route dump under way.
    dumped_oifs: BTreeSet<u32>,
    /// Follow routes (some spec is `auto`).
    routes: bool,
    /// Something may have changed the default routes since the last dump.
    routes_stale: bool,
    /// The initial dumps are done: the table is whole.
    ready: bool,
    seq: u32,
}

/// RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE and RTNLGRP_IPV6_ROUTE as bind() groups.
const GROUP_LINK: u32 = 1 << (libc::RTNLGRP_LINK - 1);
const GROUPS_ROUTE: u32 =
    (1 << (libc::RTNLGRP_IPV4_ROUTE - 1)) | (1 << (libc::RTNLGRP_IPV6_ROUTE - 1));

impl View {
    /// Subscribes, then asks for the link dump.
    fn open(routes: bool) -> anyhow::Result<View> {
        let groups = GROUP_LINK | if routes { GROUPS_ROUTE } else { 0 };
        let socket = Socket::open(groups)?;
        let mut view = View {
            socket,
            table: LinkTable::default(),
            phase: Phase::Current,
            dumped_oifs: BTreeSet::new(),
            routes,
            routes_stale: false,
            ready: false,
            seq: 0,
        };
        view.request(Dump::Links)?;
        Ok(view)
    }

    fn request(&mut self, what: Dump) -> anyhow::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&netlink::dump_request(what, seq))?;
        if what == Dump::Routes {
            self.dumped_oifs.clear();
            self.routes_stale = false;
        }
        self.phase = Phase::Dumping {
            what,
            seq,
            interrupted: false,
        };
        Ok(())
    }

    /// Reads one datagram and applies it; returns the links it named.
    fn step(&mut self, buf: &mut [u8]) -> anyhow::Result<BTreeSet<u32>> {
        let len = match self.socket.recv(buf) {
            Ok(len) => len,
            // A signal, not a failure: nothing was read.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(BTreeSet::new()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(Overrun.into()),
            Err(e) => return Err(anyhow::Error::new(e).context("reading rtnetlink")),
        };
        let mut touched = BTreeSet::new();
        for msg in netlink::parse(&buf[..len]) {
            self.message(msg, &mut touched)?;
        }
        if self.phase == Phase::Current && self.routes && self.routes_stale {
            self.request(Dump::Routes)?;
        }
        Ok(touched)
    }

    fn message(&mut self, msg: Message, touched: &mut BTreeSet<u32>) -> anyhow::Result<()> {
        let ours = self.ours(&msg);
        if ours
            && msg.interrupted
            && let Phase::Dumping { interrupted, .. } = &mut self.phase
        {
            *interrupted = true;
        }
        match msg.body {
            Body::Link(link) => {
                touched.insert(link.index);
                self.link(link);
            }
            Body::LinkGone(index) => {
                touched.insert(index);
                // Its IPv4 routes went with it, without a notification.
                self.routes_stale = true;
                self.table.links.remove(&index);
            }
            Body::Route(route) => self.route(route, ours),
            Body::Done if ours => self.dump_done()?,
            Body::Error(errno) if ours => {
                return Err(io::Error::from_raw_os_error(errno))
                    .context("the kernel refused an rtnetlink dump");
            }
            _ => {}
        }
        Ok(())
    }

    /// True for a reply to the dump under way.
    fn ours(&self, msg: &Message) -> bool {
        matches!(self.phase, Phase::Dumping { seq, .. } if seq == msg.seq)
            && msg.port == self.socket.port
    }

    fn link(&mut self, msg: LinkMsg) {
        let link = Link {
            name: msg.name,
            kind: msg.kind,
            up: msg.up,
            loopback: msg.loopback,
        };
        // IPv4 routes of a link that goes down vanish without a notification.
        let was_up = self.table.links.get(&msg.index).map(|l| l.up);
        if was_up != Some(link.up) {
            self.routes_stale = true;
        }
        self.table.links.insert(msg.index, link);
    }

    fn route(&mut self, route: RouteMsg, ours: bool) {
        if ours {
            if route.default_main {
                self.dumped_oifs.extend(route.oifs);
            }
        } else if route.default_main {
            self.routes_stale = true;
        }
    }

    /// The end of a dump: ask again if it was interrupted, else go on to
    /// the next one or to following notifications.
    fn dump_done(&mut self) -> anyhow::Result<()> {
        let Phase::Dumping {
            what, interrupted, ..
        } = self.phase
        else {
            return Ok(());
        };
        if interrupted {
            return self.request(what);
        }
        match what {
            Dump::Links if self.routes => return self.request(Dump::Routes),
            Dump::Links => {}
            Dump::Routes => self.table.default_oifs = std::mem::take(&mut self.dumped_oifs),
        }
        self.phase = Phase::Current;
        self.ready = true;
        Ok(())
    }
}

/// The kernel dropped notifications: the view must be built anew.
#[derive(Debug)]
struct Overrun;

impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rtnetlink notifications were lost (receive buffer overrun)")
    }
}

impl std::error::Error for Overrun {}

/// Large enough for any datagram rtnetlink sends (a dump fills at most a
/// page-sized skb; notifications are smaller).
const BUFFER: usize = 64 << 10;
/// How long to wait before opening a new socket after a failure.
const BACKOFF: Duration = Duration::from_secs(1);

/// Keeps the interfaces `--iface` selects attached.
pub struct Watcher {
    specs: Vec<IfaceSpec>,
    view: View,
    attachments: Attachments,
    buf: Vec<u8>,
}

impl Watcher {
    /// Reads the links (and routes) there are; `attach_all` then attaches
    /// the selected ones, `hooks_wanted` tells which hooks they take.
    pub fn open(specs: &[IfaceSpec]) -> anyhow::Result<Watcher> {
        let routes = specs.iter().any(|s| s.pattern == Pattern::Auto);
        let mut watcher = Watcher {
            specs: specs.to_vec(),
            view: View::open(routes)?,
            attachments: Attachments::default(),
            buf: vec![0; BUFFER],
        };
        while !watcher.view.ready {
            watcher.view.step(&mut watcher.buf)?;
        }
        for spec in unmatched(specs, &watcher.view.table) {
            log::info!("--iface {spec} matches no interface yet");
        }
        Ok(watcher)
    }

    /// The hooks the interfaces selected now take, each once.
    pub fn hooks_wanted(&self) -> Vec<Hook> {
        let mut hooks: Vec<Hook> = desired(&self.specs, &self.view.table)
            .into_values()
            .map(|want| want.hook)
            .collect();
        hooks.sort_unstable();
        hooks.dedup();
        hooks
    }

    /// Attaches to every interface selected now. Failing to attach to one
    /// is logged, not returned.
    pub fn attach_all(&mut self, hooks: &mut impl Hooks) {
        let all = self.view.table.links.keys().copied().collect();
        self.apply(&all, hooks);
    }

    /// Interfaces attached now.
    pub fn attached(&self) -> usize {
        self.attachments.count()
    }

    fn apply(&mut self, touched: &BTreeSet<u32>, hooks: &mut impl Hooks) {
        let want = desired(&self.specs, &self.view.table);
        self.attachments
            .apply(&want, &self.view.table, touched, hooks);
    }

    /// Follows link (and route) changes on a thread of its own until the
    /// process exits; `status` gets the number of interfaces attached.
    pub fn spawn<H: Hooks + Send + 'static>(
        mut self,
        mut hooks: H,
        status: Shared,
    ) -> anyhow::Result<()> {
        self.report(&status);
        std::thread::Builder::new()
            .name("links".into())
            .spawn(move || {
                loop {
                    self.follow(&mut hooks, &status);
                }
            })
            .context("starting the link watcher thread")?;
        Ok(())
    }

    /// One datagram's worth of changes; a failure starts over from dumps.
    fn follow(&mut self, hooks: &mut impl Hooks, status: &Shared) {
        match self.view.step(&mut self.buf) {
            Ok(touched) if self.view.ready => {
                self.apply(&touched, hooks);
                self.report(status);
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("{e:#}; reading links and routes again");
                self.resync(hooks, status);
            }
        }
    }

    /// Builds the view anew (new socket, new dumps), then applies it whole.
    fn resync(&mut self, hooks: &mut impl Hooks, status: &Shared) {
        loop {
            match self.reopen() {
                Ok(()) => break,
                Err(e) => log::error!("{e:#}; trying again in {BACKOFF:?}"),
            }
            std::thread::sleep(BACKOFF);
        }
        let all = self.view.table.links.keys().copied().collect();
        self.apply(&all, hooks);
        self.report(status);
    }

    fn reopen(&mut self) -> anyhow::Result<()> {
        self.view = View::open(self.view.routes)?;
        while !self.view.ready {
            self.view.step(&mut self.buf)?;
        }
        Ok(())
    }

    fn report(&self, status: &Shared) {
        if let Ok(mut s) = status.lock() {
            s.interfaces = self.attached();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> IfaceSpec {
        s.parse().expect(s)
    }

    fn link(name: &str, kind: Option<&str>) -> Link {
        Link {
            name: name.into(),
            kind: kind.map(Into::into),
            up: true,
            loopback: false,
        }
    }

    /// lo (1), eth0 (2), eth1 (3), veth0 (4), cni0 (5).
    fn table() -> LinkTable {
        let mut lo = link("lo", None);
        lo.loopback = true;
        let links = [
            (1, lo),
            (2, link("eth0", None)),
            (3, link("eth1", None)),
            (4, link("veth0", Some("veth"))),
            (5, link("cni0", Some("bridge"))),
        ];
        LinkTable {
            links: links.into_iter().collect(),
            default_oifs: BTreeSet::new(),
        }
    }

    fn hooks_of(want: &BTreeMap<u32, Want>) -> Vec<(String, Hook)> {
        want.values().map(|w| (w.name.clone(), w.hook)).collect()
    }

    fn pair(name: &str, hook: Hook) -> (String, Hook) {
        (name.into(), hook)
    }

    #[test]
    fn globs_select_by_name_and_kind_picks_the_hook() {
        let want = desired(&[spec("veth*"), spec("eth?"), spec("cni0")], &table());
        assert_eq!(
            hooks_of(&want),
            vec![
                pair("eth0", Hook::Xdp),
                pair("eth1", Hook::Xdp),
                pair("veth0", Hook::Tc),
                pair("cni0", Hook::Tc),
            ]
        );
    }

    #[test]
    fn the_first_matching_spec_wins() {
        let want = desired(&[spec("eth0:tc"), spec("eth*:xdp")], &table());
        assert_eq!(
            hooks_of(&want),
            vec![pair("eth0", Hook::Tc), pair("eth1", Hook::Xdp)]
        );
        let want = desired(&[spec("eth*:xdp"), spec("eth0:tc")], &table());
        assert_eq!(
            hooks_of(&want),
            vec![pair("eth0", Hook::Xdp), pair("eth1", Hook::Xdp)]
        );
    }

    #[test]
    fn loopback_is_never_selected() {
        let want = desired(&[spec("*")], &table());
        assert!(!want.contains_key(&1), "{want:?}");
        assert_eq!(want.len(), 4);
        assert_eq!(unmatched(&[spec("lo")], &table()).len(), 1);
    }

    #[test]
    fn auto_follows_the_default_routes() {
        let mut t = table();
        let specs = [spec("auto"), spec("veth*")];
        assert_eq!(
            hooks_of(&desired(&specs, &t)),
            vec![pair("veth0", Hook::Tc)]
        );
        assert_eq!(unmatched(&specs, &t), vec![&specs[0]]);
        t.default_oifs = [3, 1].into();
        assert_eq!(
            hooks_of(&desired(&specs, &t)),
            vec![pair("eth1", Hook::Xdp), pair("veth0", Hook::Tc)],
            "lo is skipped even when a default route names it"
        );
        t.default_oifs = [2, 3].into();
        assert_eq!(desired(&specs, &t).len(), 3, "every multipath nexthop");
    }

    #[test]
    fn auto_reads_default_routes_from_route_messages() {
        use netlink::tests::{Builder, route_msg, rtmsg};
        let mut buf = route_msg(libc::AF_INET as u8, 0, 3);
        buf.extend(route_msg(libc::AF_INET6 as u8, 0, 2));
        buf.extend(route_msg(libc::AF_INET as u8, 24, 4));
        buf.extend(
            Builder::new(libc::RTM_NEWROUTE, 0, 0, 0)
                .bytes(&rtmsg(libc::AF_INET as u8, 0, libc::RT_TABLE_LOCAL))
                .attr(libc::RTA_OIF, &5u32.to_ne_bytes())
                .finish(),
        );
        let mut oifs = BTreeSet::new();
        for msg in netlink::parse(&buf) {
            if let Body::Route(r) = msg.body
                && r.default_main
            {
                oifs.extend(r.oifs);
            }
        }
        let t = LinkTable {
            default_oifs: oifs,
            ..table()
        };
        assert_eq!(
            hooks_of(&desired(&[spec("auto")], &t)),
            vec![pair("eth0", Hook::Xdp), pair("eth1", Hook::Xdp)]
        );
    }

    #[test]
    fn the_kernel_dump_has_the_loopback_and_a_route_view() {
        // Dumps need no privilege: this reads the test's own namespace.
        let mut view = View::open(true).expect("a NETLINK_ROUTE socket");
        let mut buf = vec![0; BUFFER];
        while !view.ready {
            view.step(&mut buf).expect("the initial dumps");
        }
        let lo = view.table.links.values().find(|l| l.loopback);
        assert!(lo.is_some(), "no loopback in {:?}", view.table.links);
        assert!(
            view.table
                .default_oifs
                .iter()
                .all(|i| view.table.links.contains_key(i)),
            "default routes leave through known links: {:?}",
            view.table
        );
    }

    /// Records what it was asked to do; fails attaching to names in `broken`.
    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        broken: BTreeSet<String>,
    }

    impl Hooks for Fake {
        fn attach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()> {
            self.calls.push(format!("attach {hook} {name}"));
            if self.broken.contains(name) {
                anyhow::bail!("{name} is broken");
            }
            Ok(())
        }

        fn detach(&mut self, name: &str, hook: Hook) -> anyhow::Result<()> {
            self.calls.push(format!("detach {hook} {name}"));
            Ok(())
        }

        fn rename(&mut self, from: &str, to: &str, hook: Hook) -> anyhow::Result<()> {
            self.calls.push(format!("rename {hook} {from} {to}"));
            Ok(())
        }
    }

    fn step(
        attachments: &mut Attachments,
        specs: &[IfaceSpec],
        t: &LinkTable,
        touched: &[u32],
        fake: &mut Fake,
    ) -> Vec<String> {
        let touched = touched.iter().copied().collect();
        attachments.apply(&desired(specs, t), t, &touched, fake);
        std::mem::take(&mut fake.calls)
    }

    #[test]
    fn links_that_come_and_go_are_attached_and_detached() {
        let specs = [spec("veth*")];
        let (mut a, mut fake, mut t) = (Attachments::default(), Fake::default(), table());
        assert_eq!(
            step(&mut a, &specs, &t, &[], &mut fake),
            ["attach tc veth0"]
        );
        assert!(
            step(&mut a, &specs, &t, &[4], &mut fake).is_empty(),
            "no change"
        );
        t.links.insert(9, link("veth9", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[9], &mut fake),
            ["attach tc veth9"]
        );
        t.links.remove(&4);
        assert_eq!(
            step(&mut a, &specs, &t, &[4], &mut fake),
            ["detach tc veth0"]
        );
        assert_eq!(a.count(), 1);
    }

    #[test]
    fn renames_move_pins_or_detach() {
        let specs = [spec("veth*"), spec("pod*:xdp")];
        let (mut a, mut fake, mut t) = (Attachments::default(), Fake::default(), table());
        step(&mut a, &specs, &t, &[], &mut fake);
        t.links.insert(4, link("veth4", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[4], &mut fake),
            ["rename tc veth0 veth4"]
        );
        t.links.insert(4, link("pod4", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[4], &mut fake),
            ["detach tc veth4", "attach xdp pod4"],
            "another spec, another hook"
        );
        t.links.insert(4, link("other", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[4], &mut fake),
            ["detach xdp pod4"],
            "matches nothing any more"
        );
    }

    #[test]
    fn a_failed_attach_is_retried_at_its_next_event_only() {
        let specs = [spec("veth*"), spec("eth0")];
        let (mut a, mut fake, mut t) = (Attachments::default(), Fake::default(), table());
        fake.broken.insert("veth0".into());
        assert_eq!(
            step(&mut a, &specs, &t, &[], &mut fake),
            ["attach xdp eth0", "attach tc veth0"]
        );
        assert_eq!(a.count(), 1, "eth0 stays attached");
        t.links.insert(9, link("veth9", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[9], &mut fake),
            ["attach tc veth9"],
            "another link's event does not retry veth0"
        );
        fake.broken.clear();
        assert_eq!(
            step(&mut a, &specs, &t, &[4], &mut fake),
            ["attach tc veth0"]
        );
        assert_eq!(a.count(), 3);
    }

    #[test]
    fn a_name_taken_over_by_a_new_link_is_detached_first() {
        let specs = [spec("veth*")];
        let (mut a, mut fake, mut t) = (Attachments::default(), Fake::default(), table());
        step(&mut a, &specs, &t, &[], &mut fake);
        t.links.remove(&4);
        t.links.insert(10, link("veth0", Some("veth")));
        assert_eq!(
            step(&mut a, &specs, &t, &[4, 10], &mut fake),
            ["detach tc veth0", "attach tc veth0"]
        );
    }
}

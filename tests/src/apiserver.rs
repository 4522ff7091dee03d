//! A small Kubernetes API server for agent tests.
//!
//! Serves enough of the real list/watch protocol over plain HTTP/1.1 that
//! kube-rs clients and `kube::runtime::watcher` run unmodified against it:
//! Services, EndpointSlices and Nodes, listed cluster-wide or per namespace,
//! paginated lists consistent with one resourceVersion, watches that replay
//! history from a resourceVersion, bookmarks, field and label selectors, and
//! 410 Expired after compaction. Tests write objects with [`ApiServer::apply`]
//! and [`ApiServer::delete`] and make the server misbehave (compaction, closed
//! streams, 500s, refused connections, slowness) to test the agent's recovery.
//!
//! One thread per connection with blocking I/O. Watch streams sleep on a
//! Condvar that every write and every misbehaviour switch notifies; they wake
//! at least every [`LIVENESS_INTERVAL`] only to notice clients that went away.
//!
//! Not implemented: writes over HTTP (only GET), set-based label selectors,
//! field selectors other than `metadata.name` / `metadata.namespace`, and
//! `resourceVersion` / `resourceVersionMatch` on lists (always the latest).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Map, Value, json};

/// How long accept and request reads block before re-checking for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long an idle watch stream sleeps before checking that its client is
/// still connected; without it a dropped watch would hold its thread until
/// the server stops.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(250);

/// Bounds writes so a client that stopped reading cannot wedge Drop.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests whose head grows beyond this are garbage; the connection is dropped.
const MAX_HEAD: usize = 64 * 1024;

/// Request bodies are read and ignored; anything larger is not a test client.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Events kept for watch resumption; older ones are compacted away as etcd
/// would, so a very long test cannot grow memory without bound.
const MAX_HISTORY: usize = 100_000;

const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The resource kinds served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Service = 0,
    EndpointSlice = 1,
    Node = 2,
}

struct KindInfo {
    kind: &'static str,
    list_kind: &'static str,
    api_version: &'static str,
    /// URL prefix of the group/version, without a trailing slash.
    prefix: &'static str,
    plural: &'static str,
    namespaced: bool,
}

/// Indexed by `Kind as usize`.
const KINDS: [KindInfo; 3] = [
    KindInfo {
        kind: "Service",
        list_kind: "ServiceList",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "services",
        namespaced: true,
    },
    KindInfo {
        kind: "EndpointSlice",
        list_kind: "EndpointSliceList",
        api_version: "discovery.k8s.io/v1",
        prefix: "/apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        namespaced: true,
    },
    KindInfo {
        kind: "Node",
        list_kind: "NodeList",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "nodes",
        namespaced: false,
    },
];

const ALL_KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

impl Kind {
    fn info(self) -> &'static KindInfo {
        &KINDS[self as usize]
    }

    fn by_name(kind: &str) -> Option<Kind> {
        ALL_KINDS.into_iter().find(|k| k.info().kind == kind)
    }

    fn by_plural(plural: &str) -> Option<Kind> {
        ALL_KINDS.into_iter().find(|k| k.info().plural == plural)
    }
}

/// Namespace ("" for cluster-scoped kinds) and name; BTreeMap order on it is
/// the order the real server lists in (etcd key order).
type ObjKey = (String, String);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Change {
    Added,
    Modified,
    Deleted,
}

/// One write, kept for watch replay and for rebuilding older list snapshots.
struct Event {
    rv: u64,
    kind: Kind,
    key: ObjKey,
    change: Change,
    /// The object after the write; for deletions the last state with the new RV.
    object: Arc<Value>,
    /// The object before the write, so snapshots can undo it and filtered
    /// watches can tell objects entering or leaving their selector.
    prev: Option<Arc<Value>>,
}

/// Everything mutable, behind one mutex so watch streams can wait on it.
struct State {
    /// The global resourceVersion, like etcd's revision.
    rv: u64,
    objects: [BTreeMap<ObjKey, Arc<Value>>; 3],
    /// Events with rv > `history_from`, oldest first.
    history: VecDeque<Event>,
    history_from: u64,
    /// Watches and continue tokens from an RV below this get 410 Expired.
    expired_below: u64,
    /// Bumped to end every watch stream (close_watches, failing).
    watch_epoch: u64,
    /// Bumped to end every connection (going down, Drop).
    conn_epoch: u64,
    failing: bool,
    delay: Duration,
    bookmark_interval: Duration,
    /// (lists, watches) per kind.
    counters: [(usize, usize); 3],
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: Mutex::new(State::new()),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole server down.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and wakes every waiting stream to look at it.
    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let result = change(&mut self.lock());
        self.changed.notify_all();
        result
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Sleeps for `delay`; false if the connection must close meanwhile.
    fn pause(&self, delay: Duration, conn_epoch: u64) -> bool {
        let deadline = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if state.conn_epoch != conn_epoch {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            state = self.wait(state, deadline - now);
        }
    }

    fn conns(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends every connection and waits for their threads.
    fn close_connections(&self) {
        self.update(|state| state.conn_epoch += 1);
        let handles = std::mem::take(&mut *self.conns());
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl State {
    fn new() -> State {
        State {
            rv: 0,
            objects: Default::default(),
            history: VecDeque::new(),
            history_from: 0,
            expired_below: 0,
            watch_epoch: 0,
            conn_epoch: 0,
            failing: false,
            delay: Duration::ZERO,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            counters: [(0, 0); 3],
        }
    }

    fn record(
        &mut self,
        kind: Kind,
        key: ObjKey,
        change: Change,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            key,
            change,
            object,
            prev,
        });
        if self.history.len() > MAX_HISTORY
            && let Some(oldest) = self.history.pop_front()
        {
            self.history_from = oldest.rv;
            self.expired_below = self.expired_below.max(oldest.rv);
        }
    }

    /// Creates or replaces; returns the new RV.
    fn apply(&mut self, kind: Kind, key: ObjKey, mut object: Map<String, Value>) -> u64 {
        self.rv += 1;
        let prev = self.objects[kind as usize].get(&key).cloned();
        stamp(&mut object, kind, &key, self.rv, prev.as_deref());
        let object = Arc::new(Value::Object(object));
        self.objects[kind as usize].insert(key.clone(), Arc::clone(&object));
        let change = if prev.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(kind, key, change, object, prev);
        self.rv
    }

    fn delete(&mut self, kind: Kind, key: ObjKey) -> Option<u64> {
        let prev = self.objects[kind as usize].remove(&key)?;
        self.rv += 1;
        // The DELETED event carries the last state, stamped with the deletion's RV.
        let mut last = (*prev).clone();
        if let Some(Value::Object(meta)) = last.get_mut("metadata") {
            meta.insert("resourceVersion".into(), self.rv.to_string().into());
        }
        self.record(kind, key, Change::Deleted, Arc::new(last), Some(prev));
        Some(self.rv)
    }

    /// Drops all history and moves the RV past everything handed out so far,
    /// so even a fully caught-up client resuming from its last RV gets 410.
    fn compact(&mut self) {
        self.history.clear();
        self.history_from = self.rv;
        self.rv += 1;
        self.expired_below = self.rv;
    }

    /// The objects of `kind` as they were at RV `at`, in list order; None if
    /// the history needed to rebuild them was compacted away.
    fn snapshot(&self, kind: Kind, at: u64) -> Option<Vec<Arc<Value>>> {
        if at < self.expired_below {
            return None;
        }
        // Nothing to undo (every page of a list no write interrupted): the
        // values alone, without copying the keys.
        let current = self.objects[kind as usize].values();
        if self.history.back().is_none_or(|e| e.rv <= at) {
            return Some(current.cloned().collect());
        }
        let mut objects = self.objects[kind as usize].clone();
        // Undo, newest first, every write made after the snapshot.
        for event in self.history.iter().rev().take_while(|e| e.rv > at) {
            if event.kind != kind {
                continue;
            }
            match &event.prev {
                Some(prev) => objects.insert(event.key.clone(), Arc::clone(prev)),
                None => objects.remove(&event.key),
            };
        }
        Some(objects.into_values().collect())
    }

    /// Watch lines for every event after `cursor` that `filter` lets through.
    fn lines_after(&self, cursor: u64, kind: Kind, filter: &Filter) -> Vec<String> {
        let start = self.history.partition_point(|e| e.rv <= cursor);
        self.history
            .range(start..)
            .filter(|e| e.kind == kind)
            .filter_map(|e| visible(e, filter))
            .map(|(change, object)| event_line(change, object))
            .collect()
    }

    fn count(&mut self, route: &Route, watch: bool) {
        if let Route::Collection { kind, .. } = route {
            let counter = &mut self.counters[*kind as usize];
            if watch {
                counter.1 += 1;
            } else {
                counter.0 += 1;
            }
        }
    }
}

/// What a watcher with `filter` sees of `event`: objects moving into the
/// selector appear as ADDED and objects moving out as DELETED, as on a real
/// server.
fn visible<'a>(event: &'a Event, filter: &Filter) -> Option<(&'static str, &'a Value)> {
    let now = filter.matches(&event.object);
    let before = event.prev.as_ref().is_some_and(|p| filter.matches(p));
    let change = match (event.change, before, now) {
        (Change::Added, _, true) | (Change::Modified, false, true) => "ADDED",
        (Change::Modified, true, true) => "MODIFIED",
        (Change::Modified, true, false) | (Change::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    Some((change, &event.object))
}

/// Checks an object handed to `apply` and finds its kind and key.
fn prepare(object: Value) -> Result<(Kind, ObjKey, Map<String, Value>)> {
    let Value::Object(mut root) = object else {
        bail!("object must be a JSON object");
    };
    let kind_name = root
        .get("kind")
        .and_then(Value::as_str)
        .context("object has no \"kind\"")?;
    let kind = Kind::by_name(kind_name).with_context(|| {
        format!("unsupported kind {kind_name:?} (Service, EndpointSlice, Node)")
    })?;
    let info = kind.info();
    if let Some(api_version) = root.get("apiVersion").and_then(Value::as_str) {
        ensure!(
            api_version == info.api_version,
            "{} must have apiVersion {}, not {api_version}",
            info.kind,
            info.api_version
        );
    }
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object()
        .context("metadata is not an object")?;
    let name = non_empty(meta.get("name")).context("metadata.name is required")?;
    // As with kubectl, a namespaced object without a namespace goes to "default";
    // a namespace on a cluster-scoped object is meaningless and dropped.
    let namespace = match info.namespaced {
        true => non_empty(meta.get("namespace")).unwrap_or("default"),
        false => "",
    };
    let key = (namespace.to_string(), name.to_string());
    Ok((kind, key, root))
}

fn non_empty(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Sets what the server owns: type fields, key, resourceVersion, and uid and
/// creationTimestamp (kept from the previous version on replace).
fn stamp(root: &mut Map<String, Value>, kind: Kind, key: &ObjKey, rv: u64, prev: Option<&Value>) {
    let info = kind.info();
    root.insert("apiVersion".into(), info.api_version.into());
    root.insert("kind".into(), info.kind.into());
    let Some(Value::Object(meta)) = root.get_mut("metadata") else {
        return; // prepare() guarantees an object
    };
    meta.insert("name".into(), key.1.clone().into());
    if info.namespaced {
        meta.insert("namespace".into(), key.0.clone().into());
    } else {
        meta.remove("namespace");
    }
    meta.insert("resourceVersion".into(), rv.to_string().into());
    let prev_meta = prev.and_then(|p| p.get("metadata"));
    keep_or(meta, "uid", prev_meta, new_uid);
    keep_or(meta, "creationTimestamp", prev_meta, rfc3339_now);
}

/// Leaves `field` if set, else copies it from the previous version, else makes one.
fn keep_or(
    meta: &mut Map<String, Value>,
    field: &str,
    prev: Option<&Value>,
    fresh: fn() -> String,
) {
    if non_empty(meta.get(field)).is_some() {
        return;
    }
    let value = non_empty(prev.and_then(|p| p.get(field))).map_or_else(fresh, str::to_owned);
    meta.insert(field.to_owned(), value.into());
}

fn new_uid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm), to avoid a date crate for one field.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------
// Selectors

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Equals,
    NotEquals,
    Exists,
    NotExists,
}

#[derive(Debug)]
struct Requirement {
    key: String,
    op: Op,
    value: String,
}

impl Requirement {
    fn matches(&self, actual: Option<&str>) -> bool {
        match self.op {
            Op::Equals => actual == Some(self.value.as_str()),
            Op::NotEquals => actual != Some(self.value.as_str()),
            Op::Exists => actual.is_some(),
            Op::NotExists => actual.is_none(),
        }
    }
}

/// Which objects a request sees: its namespace and selectors.
#[derive(Debug, Default)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

impl Filter {
    fn from_query(namespace: Option<String>, query: &Query) -> Result<Filter, String> {
        Ok(Filter {
            namespace,
            fields: parse_selector(query.get("fieldSelector").unwrap_or(""), false)?,
            labels: parse_selector(query.get("labelSelector").unwrap_or(""), true)?,
        })
    }

    fn selects_all(&self) -> bool {
        self.namespace.is_none() && self.fields.is_empty() && self.labels.is_empty()
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let field = |key: &str| match key {
            "metadata.name" => Some(meta["name"].as_str().unwrap_or("")),
            _ => Some(namespace), // parse_selector admits only these two
        };
        self.fields.iter().all(|r| r.matches(field(&r.key)))
            && self
                .labels
                .iter()
                .all(|r| r.matches(meta["labels"][r.key.as_str()].as_str()))
    }
}

/// Parses the equality-based selector syntax; existence terms (`key`, `!key`)
/// only for labels.
fn parse_selector(selector: &str, labels: bool) -> Result<Vec<Requirement>, String> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| parse_term(term, labels))
        .collect()
}

fn parse_term(term: &str, labels: bool) -> Result<Requirement, String> {
    let (key, op, value) = if let Some((k, v)) = term.split_once("!=") {
        (k, Op::NotEquals, v)
    } else if let Some((k, v)) = term.split_once("==") {
        (k, Op::Equals, v)
    } else if let Some((k, v)) = term.split_once('=') {
        (k, Op::Equals, v)
    } else if !labels {
        return Err(format!("invalid field selector term {term:?}"));
    } else if let Some(k) = term.strip_prefix('!') {
        (k, Op::NotExists, "")
    } else {
        (term, Op::Exists, "")
    };
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() || key.contains([' ', '(', ')', '!']) {
        return Err(format!(
            "unsupported selector term {term:?} (set-based selectors are not implemented)"
        ));
    }
    if !labels && key != "metadata.name" && key != "metadata.namespace" {
        return Err(format!("field label not supported: {key}"));
    }
    Ok(Requirement {
        key: key.to_string(),
        op,
        value: value.to_string(),
    })
}

// ---------------------------------------------------------------------------
// HTTP

/// Decoded query parameters in request order.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Query {
        Query(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (url_decode(key, true), url_decode(value, true))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Percent-decoding; `plus_is_space` for form-encoded query strings, which is
/// how kube-client encodes them. Malformed escapes are kept literally.
fn url_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (b'+', _) if plus_is_space => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    query: Query,
    keep_alive: bool,
}

/// Length of the head (through the blank line) and of the body of the first
/// request in `buf`, once the head is complete.
fn frame(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        ensure!(
            buf.len() <= MAX_HEAD,
            "request head larger than {MAX_HEAD} bytes"
        );
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]);
    let mut body_len = 0;
    for (name, value) in head.lines().skip(1).filter_map(|l| l.split_once(':')) {
        let name = name.trim();
        // Only GETs are expected; a chunked body would desynchronise framing.
        ensure!(
            !name.eq_ignore_ascii_case("transfer-encoding"),
            "chunked request bodies are not supported"
        );
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value.trim().parse().context("bad Content-Length")?;
        }
    }
    ensure!(
        body_len <= MAX_BODY,
        "request body larger than {MAX_BODY} bytes"
    );
    Ok(Some((head_len, body_len)))
}

fn parse_head(head: &[u8]) -> Result<Request> {
    let head = std::str::from_utf8(head).context("request head is not UTF-8")?;
    let mut lines = head.lines();
    let request_line = lines.next().context("empty request")?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line {request_line:?}");
    };
    let connection = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("connection"))
        .map(|(_, value)| value.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let keep_alive = match version {
        "HTTP/1.0" => connection == "keep-alive",
        _ => connection != "close",
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: Query::parse(query),
        keep_alive,
    })
}

/// Reads the next request, skipping its body. None when the client closed
/// or the server is closing connections.
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shared: &Shared,
    conn_epoch: u64,
) -> Result<Option<Request>> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((head_len, body_len)) = frame(buf)?
            && buf.len() >= head_len + body_len
        {
            let request = parse_head(&buf[..head_len])?;
            buf.drain(..head_len + body_len);
            return Ok(Some(request));
        }
        if shared.lock().conn_epoch != conn_epoch {
            return Ok(None);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading request"),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A complete (non-streaming) response.
struct Response {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn json(code: u16, value: &Value) -> Response {
        Response {
            code,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    fn status(code: u16, reason: &str, message: &str) -> Response {
        Response::json(code, &status_value(code, reason, message))
    }

    fn write(&self, stream: &mut TcpStream, keep_alive: bool) -> Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            self.code,
            reason_phrase(self.code),
            self.content_type,
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        stream.write_all(&bytes).context("writing response")
    }
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        500 => "Internal Server Error",
        _ => "",
    }
}

// ---------------------------------------------------------------------------
// Routing and responses

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
    Version,
    Health,
    Unknown,
}

fn route(path: &str) -> Route {
    match path {
        "/version" => return Route::Version,
        "/healthz" | "/readyz" | "/livez" => return Route::Health,
        _ => {}
    }
    for kind in ALL_KINDS {
        let info = kind.info();
        let Some(rest) = path
            .strip_prefix(info.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let segments: Vec<String> = rest.split('/').map(|s| url_decode(s, false)).collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let plural = info.plural;
        let found = match (info.namespaced, segments.as_slice()) {
            (_, [p]) if *p == plural => Route::Collection {
                kind,
                namespace: None,
            },
            (false, [p, name]) if *p == plural => Route::Object {
                kind,
                namespace: String::new(),
                name: name.to_string(),
            },
            (true, ["namespaces", ns, p]) if *p == plural => Route::Collection {
                kind,
                namespace: Some(ns.to_string()),
            },
            (true, ["namespaces", ns, p, name]) if *p == plural => Route::Object {
                kind,
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            _ => continue,
        };
        return found;
    }
    Route::Unknown
}

/// What to send for a request.
enum Reply {
    Full(Response),
    Watch(Kind, Filter, WatchParams),
}

fn reply(shared: &Shared, request: &Request, route: Route) -> Reply {
    if shared.lock().failing {
        let message = "the test API server is set to fail";
        return Reply::Full(Response::status(500, "InternalError", message));
    }
    if request.method != "GET" {
        let message = format!("{} is not supported by the test API server", request.method);
        return Reply::Full(Response::status(405, "MethodNotAllowed", &message));
    }
    match route {
        Route::Collection { kind, namespace } => collection_reply(shared, request, kind, namespace),
        Route::Object {
            kind,
            namespace,
            name,
        } => Reply::Full(get_object(&shared.lock(), kind, namespace, &name)),
        Route::Version => Reply::Full(Response::json(200, &version_info())),
        Route::Health => Reply::Full(Response {
            code: 200,
            content_type: "text/plain",
            body: b"ok".to_vec(),
        }),
        Route::Unknown => {
            let message = format!(
                "the server could not find the requested resource {}",
                request.path
            );
            Reply::Full(Response::status(404, "NotFound", &message))
        }
    }
}

fn collection_reply(
    shared: &Shared,
    request: &Request,
    kind: Kind,
    namespace: Option<String>,
) -> Reply {
    let filter = match Filter::from_query(namespace, &request.query) {
        Ok(filter) => filter,
        Err(message) => return Reply::Full(Response::status(400, "BadRequest", &message)),
    };
    if request.query.flag("watch") {
        return match WatchParams::parse(&request.query) {
            Ok(params) => Reply::Watch(kind, filter, params),
            Err(message) => Reply::Full(Response::status(400, "BadRequest", &message)),
        };
    }
    // Cut under the lock, written out after it: the lists of other kinds
    // and the watches go on meanwhile, as a real API server's would.
    let page = list(&shared.lock(), kind, &filter, &request.query);
    Reply::Full(page.map_or_else(|refused| refused, |page| page.response()))
}

/// A page of a list, cut from a snapshot.
struct Page {
    kind: Kind,
    at: u64,
    items: Vec<Arc<Value>>,
    /// Where the next page starts in the snapshot, and how many items are
    /// left for it (unknown with a selector).
    next: Option<(usize, Option<usize>)>,
}

impl Page {
    fn response(&self) -> Response {
        let mut metadata = json!({ "resourceVersion": self.at.to_string() });
        if let Some((end, remaining)) = self.next {
            metadata["continue"] = format!("{}.{end}", self.at).into();
            if let Some(remaining) = remaining {
                metadata["remainingItemCount"] = remaining.into();
            }
        }
        let info = self.kind.info();
        let head = json!({
            "kind": info.list_kind,
            "apiVersion": info.api_version,
            "metadata": metadata,
        })
        .to_string();
        // The head's closing brace gives way to the items, written as they
        // are rather than copied into one more value first.
        let mut body = head.into_bytes();
        body.pop();
        body.extend_from_slice(br#","items":["#);
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            if serde_json::to_writer(&mut body, &**item).is_err() {
                return Response::status(500, "InternalError", "encoding an object");
            }
        }
        body.extend_from_slice(b"]}");
        Response {
            code: 200,
            content_type: "application/json",
            body,
        }
    }
}

fn get_object(state: &State, kind: Kind, namespace: String, name: &str) -> Response {
    let key = (namespace, name.to_string());
    if let Some(object) = state.objects[kind as usize].get(&key) {
        return Response::json(200, object);
    }
    let plural = kind.info().plural;
    let mut status = status_value(404, "NotFound", &format!("{plural} \"{name}\" not found"));
    status["details"] = json!({ "name": name, "kind": plural });
    Response::json(404, &status)
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-xdproxy-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// A page of the list. Continue tokens are `SNAPSHOT_RV.OFFSET`: later pages
/// are cut from the same snapshot, rebuilt from history.
fn list(state: &State, kind: Kind, filter: &Filter, query: &Query) -> Result<Page, Response> {
    let limit = match query
        .get("limit")
        .filter(|l| !l.is_empty())
        .map(str::parse::<usize>)
    {
        None => None,
        Some(Ok(limit)) => Some(limit).filter(|l| *l > 0),
        Some(Err(_)) => return Err(Response::status(400, "BadRequest", "invalid limit")),
    };
    let (at, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (state.rv, 0),
        Some(token) => match parse_continue(token).filter(|(at, _)| *at <= state.rv) {
            Some(parsed) => parsed,
            None => {
                return Err(Response::status(
                    400,
                    "BadRequest",
                    "invalid continue token",
                ));
            }
        },
    };
    let Some(objects) = state.snapshot(kind, at) else {
        let message = "The provided continue parameter is too old to display a consistent list result. \
                       You can start a new list without the continue parameter.";
        return Err(Response::status(410, "Expired", message));
    };
    // A page scans from where the last one stopped (the token's offset is
    // a position in the snapshot, as a real API server's token is a key):
    // every page filtering the whole collection made a list quadratic.
    let mut rest = objects.into_iter().enumerate().skip(offset);
    let mut items = Vec::new();
    let mut next = None;
    for (position, object) in rest.by_ref() {
        if !filter.matches(&object) {
            continue;
        }
        if limit.is_some_and(|l| items.len() == l) {
            next = Some(position);
            break;
        }
        items.push(object);
    }
    // As a real API server: the count left only for lists without a
    // selector, where it is exact without reading the rest.
    let remaining = next.map(|_| match filter.selects_all() {
        true => Some(rest.len() + 1),
        false => None,
    });
    Ok(Page {
        kind,
        at,
        next: next.zip(remaining),
        items,
    })
}

fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let (at, offset) = token.split_once('.')?;
    Some((at.parse().ok()?, offset.parse().ok()?))
}

// ---------------------------------------------------------------------------
// Watches

#[derive(Debug)]
struct WatchParams {
    /// Resume after this RV; None starts with the current state as ADDED events.
    from: Option<u64>,
    /// `sendInitialEvents=true`: current state, then an initial-events-end bookmark.
    initial_events: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

impl WatchParams {
    fn parse(query: &Query) -> Result<WatchParams, String> {
        let from = match query.get("resourceVersion") {
            None | Some("" | "0") => None,
            Some(rv) => Some(
                rv.parse()
                    .map_err(|_| format!("invalid resource version {rv:?}"))?,
            ),
        };
        let timeout = match query.get("timeoutSeconds") {
            None | Some("") => None,
            Some(secs) => Some(Duration::from_secs(
                secs.parse()
                    .map_err(|_| format!("invalid timeoutSeconds {secs:?}"))?,
            )),
        };
        Ok(WatchParams {
            from,
            initial_events: query.flag("sendInitialEvents"),
            bookmarks: query.flag("allowWatchBookmarks"),
            timeout,
        })
    }
}

/// One `{"type":..,"object":..}` line of a watch stream.
fn event_line(change: &str, object: &Value) -> String {
    format!("{{\"type\":\"{change}\",\"object\":{object}}}\n")
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> String {
    let info = kind.info();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let object = json!({ "kind": info.kind, "apiVersion": info.api_version, "metadata": metadata });
    event_line("BOOKMARK", &object)
}

fn expired_line(requested: u64, oldest: u64) -> String {
    let message = format!("too old resource version: {requested} ({oldest})");
    event_line("ERROR", &status_value(410, "Expired", &message))
}

/// The position and limits of one open watch stream.
struct Watch {
    kind: Kind,
    filter: Filter,
    /// Every event up to this RV has been considered for the stream.
    cursor: u64,
    bookmarks: bool,
    last_bookmark: Instant,
    deadline: Option<Instant>,
    watch_epoch: u64,
    conn_epoch: u64,
}

/// What a watch stream does next.
enum Step {
    Send(Vec<String>),
    /// Woke without anything to send: time to check the client is still there.
    Idle,
    End {
        last: Option<String>,
        keep_alive: bool,
    },
}

impl Watch {
    /// The first lines of the stream, and the stream unless it ends right
    /// there (resuming from a compacted RV).
    fn begin(
        state: &State,
        kind: Kind,
        filter: Filter,
        params: &WatchParams,
        conn_epoch: u64,
    ) -> (Vec<String>, Option<Watch>) {
        let mut lines = Vec::new();
        let cursor = match params.from {
            Some(rv) if rv < state.expired_below && !params.initial_events => {
                return (vec![expired_line(rv, state.expired_below)], None);
            }
            // Resuming: replay retained history. An RV from the future simply
            // waits for it, where a real server would time out after a while.
            Some(rv) if !params.initial_events => {
                lines = state.lines_after(rv, kind, &filter);
                rv.max(state.rv)
            }
            _ => {
                let objects = state.objects[kind as usize].values();
                lines.extend(
                    objects
                        .filter(|o| filter.matches(o))
                        .map(|o| event_line("ADDED", o)),
                );
                if params.initial_events && params.bookmarks {
                    lines.push(bookmark_line(kind, state.rv, true));
                }
                state.rv
            }
        };
        let now = Instant::now();
        let watch = Watch {
            kind,
            filter,
            cursor,
            bookmarks: params.bookmarks,
            last_bookmark: now,
            deadline: params.timeout.map(|t| now + t),
            watch_epoch: state.watch_epoch,
            conn_epoch,
        };
        (lines, Some(watch))
    }

    fn ended(&self, state: &State) -> Option<Step> {
        // Going down or dropped: the connection closes as well.
        if state.conn_epoch != self.conn_epoch {
            return Some(Step::End {
                last: None,
                keep_alive: false,
            });
        }
        // close_watches or failing: a clean end keeps the connection, since
        // the client pools it again as soon as it reads the last chunk and
        // closing it then would fail the client's next request at random.
        if state.watch_epoch != self.watch_epoch {
            return Some(Step::End {
                last: None,
                keep_alive: true,
            });
        }
        if self.cursor < state.history_from {
            // Events this stream had not sent yet were compacted away.
            let last = Some(expired_line(self.cursor, state.expired_below));
            return Some(Step::End {
                last,
                keep_alive: true,
            });
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Step::End {
                last: None,
                keep_alive: true,
            });
        }
        None
    }

    fn next_step(&mut self, shared: &Shared) -> Step {
        let state = shared.lock();
        if let Some(end) = self.ended(&state) {
            return end;
        }
        let lines = state.lines_after(self.cursor, self.kind, &self.filter);
        self.cursor = self.cursor.max(state.rv);
        if !lines.is_empty() {
            return Step::Send(lines);
        }
        let now = Instant::now();
        let interval = state.bookmark_interval;
        // A zero interval disables bookmarks rather than flooding the client.
        let bookmarks = self.bookmarks && !interval.is_zero();
        let next_bookmark = self.last_bookmark + interval;
        if bookmarks && now >= next_bookmark {
            self.last_bookmark = now;
            return Step::Send(vec![bookmark_line(self.kind, self.cursor, false)]);
        }
        let mut wait = LIVENESS_INTERVAL;
        if bookmarks {
            wait = wait.min(next_bookmark - now);
        }
        if let Some(deadline) = self.deadline {
            wait = wait.min(deadline.saturating_duration_since(now));
        }
        drop(shared.wait(state, wait));
        Step::Idle
    }
}

const WATCH_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Each line in its own chunk, written at once.
fn write_chunks(stream: &mut TcpStream, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(format!("{:x}\r\n", line.len()).as_bytes());
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    stream.write_all(&bytes).context("writing watch events")
}

/// Streams a watch; returns whether the connection may serve another request.
fn serve_watch(
    stream: &mut TcpStream,
    shared: &Shared,
    kind: Kind,
    filter: Filter,
    params: &WatchParams,
    conn_epoch: u64,
) -> Result<bool> {
    let (first, watch) = Watch::begin(&shared.lock(), kind, filter, params, conn_epoch);
    stream.write_all(WATCH_HEAD).context("writing watch head")?;
    write_chunks(stream, &first)?;
    let Some(mut watch) = watch else {
        stream.write_all(b"0\r\n\r\n").context("ending watch")?;
        return Ok(true);
    };
    loop {
        match watch.next_step(shared) {
            Step::Send(lines) => write_chunks(stream, &lines)?,
            Step::Idle if client_closed(stream) => return Ok(false),
            Step::Idle => {}
            Step::End { last, keep_alive } => {
                write_chunks(stream, last.as_slice())?;
                stream.write_all(b"0\r\n\r\n").context("ending watch")?;
                return Ok(keep_alive);
            }
        }
    }
}

/// True if the peer hung up; a watch client never sends anything else.
fn client_closed(stream: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; zero timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

// ---------------------------------------------------------------------------
// Connections

fn serve_connection(mut stream: TcpStream, shared: &Shared, conn_epoch: u64) -> Result<()> {
    // Accepted sockets must block (with timeouts) regardless of the listener.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf, shared, conn_epoch)? {
        if !respond(&mut stream, shared, &request, conn_epoch)? {
            break;
        }
    }
    Ok(())
}

/// Answers one request; returns whether to keep the connection.
fn respond(
    stream: &mut TcpStream,
    shared: &Shared,
    request: &Request,
    conn_epoch: u64,
) -> Result<bool> {
    let route = route(&request.path);
    let delay = {
        let mut state = shared.lock();
        state.count(&route, request.query.flag("watch"));
        state.delay
    };
    if !delay.is_zero() && !shared.pause(delay, conn_epoch) {
        return Ok(false);
    }
    match reply(shared, request, route) {
        Reply::Full(response) => {
            response.write(stream, request.keep_alive)?;
            Ok(request.keep_alive)
        }
        Reply::Watch(kind, filter, params) => {
            let keep = serve_watch(stream, shared, kind, filter, &params, conn_epoch)?;
            Ok(keep && request.keep_alive)
        }
    }
}

/// The accept loop of one "up" period; `shutdown` closes its listener.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Acceptor {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Result<Acceptor> {
        // Nonblocking so the loop can notice `stop` between polls.
        listener
            .set_nonblocking(true)
            .context("making the API server listener nonblocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let loop_stop = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("apiserver-accept".into())
            .spawn(move || accept_loop(&listener, &shared, &loop_stop))
            .context("spawning the API server accept thread")?;
        Ok(Acceptor { stop, thread })
    }

    /// Returns once the listener is closed.
    fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => spawn_connection(stream, shared),
            Err(e) if e.kind() == ErrorKind::WouldBlock => crate::servers::wait_readable(listener),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // E.g. ECONNABORTED when a client resets before accept; keep serving.
            Err(e) => {
                eprintln!("apiserver: accept failed: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

fn spawn_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let conn_epoch = shared.lock().conn_epoch;
    let conn_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("apiserver-conn".into())
        // Resets and malformed requests are normal in resilience tests; just close.
        .spawn(move || drop(serve_connection(stream, &conn_shared, conn_epoch)));
    let mut conns = shared.conns();
    // Reap finished connections so long tests do not accumulate handles.
    conns.retain(|h| !h.is_finished());
    match spawned {
        Ok(handle) => conns.push(handle),
        Err(e) => eprintln!("apiserver: no thread for a connection: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Network namespaces, for re-binding after set_down

/// The network namespace `listener` lives in (needs CAP_NET_ADMIN).
fn listener_netns(listener: &TcpListener) -> Option<File> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SIOCGSKNS) };
    // SAFETY: on success `fd` is a fresh descriptor that nothing else owns.
    (fd >= 0).then(|| File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn thread_netns() -> Option<File> {
    File::open("/proc/thread-self/ns/net").ok()
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("binding the API server to {addr}"))
}

/// Binds `addr` in `netns` from a helper thread, since setns affects only the
/// calling thread and the caller's namespace must not change.
fn bind_in(netns: &File, addr: SocketAddr) -> Result<TcpListener> {
    if thread_netns().is_some_and(|here| same_file(&here, netns)) {
        return bind(addr);
    }
    let netns = netns.try_clone().context("duplicating the namespace fd")?;
    let handle = thread::Builder::new()
        .name("apiserver-bind".into())
        .spawn(move || {
            // SAFETY: plain syscall on a valid, open fd; affects only this thread.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("entering the listener's network namespace");
            }
            bind(addr)
        })
        .context("spawning the re-bind thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("the re-bind thread panicked"))?
}

// ---------------------------------------------------------------------------
// Public API

/// A running test API server; dropping it stops accepting, closes every
/// connection and stream and joins all threads.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Where to re-bind after `set_down`; None means the calling thread's namespace.
    netns: Option<File>,
    /// None while down.
    acceptor: Mutex<Option<Acceptor>>,
}

impl ApiServer {
    /// Starts on 127.0.0.1:0 in the calling thread's network namespace.
    pub fn start() -> Result<ApiServer> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        // Bound right here, so this thread's namespace is the listener's even
        // without the privilege listener_netns needs.
        let netns = listener_netns(&listener).or_else(thread_netns);
        ApiServer::start_with(listener, netns)
    }

    /// Starts on a listener the caller bound (e.g. inside a test network
    /// namespace). `set_down(false)` re-binds in the listener's namespace if
    /// the process has CAP_NET_ADMIN, else in the calling thread's.
    pub fn start_on(listener: TcpListener) -> Result<ApiServer> {
        let netns = listener_netns(&listener);
        ApiServer::start_with(listener, netns)
    }

    /// Starts on 127.0.0.1:0 inside `ns`, as an API server reachable from a
    /// node whose namespace that is.
    pub fn start_in(ns: &crate::netns::Netns) -> Result<ApiServer> {
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        ApiServer::start_on(listener)
    }

    fn start_with(listener: TcpListener, netns: Option<File>) -> Result<ApiServer> {
        let addr = listener
            .local_addr()
            .context("reading the listener address")?;
        let shared = Arc::new(Shared::new());
        let acceptor = Acceptor::spawn(listener, Arc::clone(&shared))?;
        Ok(ApiServer {
            shared,
            addr,
            netns,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (the listener's IP unless it is unspecified).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Writes a kubeconfig pointing at [`ApiServer::url`] without auth;
    /// cluster, context and user are all named "test", namespace default.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: test\n  cluster:\n    server: {}\n\
             contexts:\n\
             - name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\n\
             current-context: test\n\
             users:\n\
             - name: test\n  user: {{}}\n\
             preferences: {{}}\n",
            self.url()
        );
        std::fs::write(path, config)
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Creates or replaces an object (full JSON with `kind`; namespaced
    /// objects without a namespace go to "default"). The server sets
    /// `apiVersion`, `kind`, `metadata.resourceVersion`, and `uid` and
    /// `creationTimestamp` when missing. Returns the new resourceVersion.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let (kind, key, object) = prepare(object)?;
        Ok(self.shared.update(|state| state.apply(kind, key, object)))
    }

    /// Deletes by kind ("Service" | "EndpointSlice" | "Node"), namespace
    /// (ignored for Node) and name. Ok(None) if it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Option<u64>> {
        let kind = Kind::by_name(kind).with_context(|| format!("unsupported kind {kind:?}"))?;
        let namespace = if kind.info().namespaced {
            namespace
        } else {
            ""
        };
        let key = (namespace.to_string(), name.to_string());
        Ok(self.shared.update(|state| state.delete(kind, key)))
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets all event history and advances the resourceVersion by one
    /// (without an event), so every watch resuming from any RV handed out
    /// before this call, and every continue token, gets 410 Expired. Open
    /// streams that already sent everything keep running.
    pub fn compact(&self) {
        self.shared.update(State::compact);
    }

    /// Ends every open watch stream now (clean chunked end; the connection
    /// stays usable), as an API server restart or load balancer would.
    pub fn close_watches(&self) {
        self.shared.update(|state| state.watch_epoch += 1);
    }

    /// While true, every request is answered 500 with a Status body (reason
    /// InternalError); turning it on closes open watches.
    pub fn set_failing(&self, failing: bool) {
        self.shared.update(|state| {
            state.failing = failing;
            if failing {
                state.watch_epoch += 1;
            }
        });
    }

    /// While true, the listener is closed (connections refused) and every
    /// connection is closed; returns once that is so. Setting it back to
    /// false listens again on the same address.
    pub fn set_down(&self, down: bool) -> Result<()> {
        let mut acceptor = self.acceptor.lock().unwrap_or_else(PoisonError::into_inner);
        if down {
            if let Some(running) = acceptor.take() {
                running.shutdown();
                self.shared.close_connections();
            }
        } else if acceptor.is_none() {
            let listener = match &self.netns {
                Some(netns) => bind_in(netns, self.addr)?,
                None => bind(self.addr)?,
            };
            *acceptor = Some(Acceptor::spawn(listener, Arc::clone(&self.shared))?);
        }
        Ok(())
    }

    /// Adds a delay before every response (a slow server); for watches it
    /// delays the start of the stream, not the events in it.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.update(|state| state.delay = delay);
    }

    /// How often watches that asked for bookmarks get one (default 1 s;
    /// zero disables them).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.update(|state| state.bookmark_interval = every);
    }

    /// (lists, watches) requested so far for "services", "endpointslices" or
    /// "nodes", cluster-wide or namespaced, including those answered with an
    /// error; each page of a paginated list counts. (0, 0) for others.
    pub fn requests(&self, resource: &str) -> (usize, usize) {
        Kind::by_plural(resource).map_or((0, 0), |kind| self.shared.lock().counters[kind as usize])
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let acceptor = self
            .acceptor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(acceptor) = acceptor {
            acceptor.shutdown();
        }
        self.shared.close_connections();
    }
}

#[cfg(test)]
mod unit {
    use std::io::{BufRead, BufReader};

    use super::*;

    fn service(namespace: &str, name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": namespace, "name": name, "labels": labels },
            "spec": { "clusterIP": "10.96.0.10" },
        })
    }

    fn node(name: &str) -> Value {
        json!({ "kind": "Node", "metadata": { "name": name } })
    }

    /// A raw HTTP/1.1 client, so these tests exercise the wire format itself.
    struct Client {
        reader: BufReader<TcpStream>,
    }

    impl Client {
        fn connect(server: &ApiServer) -> Result<Client> {
            let stream = TcpStream::connect(server.addr())?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(Client {
                reader: BufReader::new(stream),
            })
        }

        fn send(&mut self, path: &str) -> Result<u16> {
            let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            self.reader.get_mut().write_all(request.as_bytes())?;
            let status_line = self.line()?;
            let code = status_line
                .split(' ')
                .nth(1)
                .context("no status")?
                .parse()?;
            Ok(code)
        }

        fn line(&mut self) -> Result<String> {
            let mut line = String::new();
            ensure!(self.reader.read_line(&mut line)? > 0, "connection closed");
            Ok(line.trim_end().to_string())
        }

        /// Reads headers and a Content-Length body.
        fn body(&mut self) -> Result<Value> {
            let mut length = 0;
            loop {
                let line = self.line()?;
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse()?;
                }
            }
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body)?;
            Ok(serde_json::from_slice(&body)?)
        }

        /// Skips the headers of a chunked response.
        fn stream_head(&mut self) -> Result<()> {
            while !self.line()?.is_empty() {}
            Ok(())
        }

        /// The next watch event, or None at the end of the stream.
        fn event(&mut self) -> Result<Option<Value>> {
            let size = usize::from_str_radix(&self.line()?, 16)?;
            if size == 0 {
                ensure!(self.line()?.is_empty(), "no CRLF after the last chunk");
                return Ok(None);
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk)?;
            ensure!(chunk.ends_with(b"\n\r\n"), "chunk is not one line");
            Ok(Some(serde_json::from_slice(&chunk[..size])?))
        }

        fn get(&mut self, path: &str) -> Result<(u16, Value)> {
            let code = self.send(path)?;
            Ok((code, self.body()?))
        }
    }

    fn names(list: &Value) -> Vec<&str> {
        list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn event_summary(event: &Value) -> (String, String) {
        let kind = event["type"].as_str().unwrap_or("?").to_string();
        let name = event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (kind, name)
    }

    #[test]
    fn query_and_selectors() -> Result<()> {
        let query = Query::parse("fieldSelector=metadata.name%3Dnode-1&watch=1&l=a+b%2");
        assert_eq!(query.get("fieldSelector"), Some("metadata.name=node-1"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("l"), Some("a b%2"));
        let labels = Query::parse("labelSelector=app%3Dweb%2C%21skip");
        let filter = Filter::from_query(Some("ns".into()), &labels).map_err(|e| anyhow!(e))?;
        assert!(filter.matches(&service("ns", "a", json!({ "app": "web" }))));
        assert!(!filter.matches(&service("other", "a", json!({ "app": "web" }))));
        assert!(!filter.matches(&service("ns", "a", json!({ "app": "web", "skip": "" }))));
        assert!(!filter.matches(&service("ns", "a", json!({}))));
        assert!(parse_selector("app in (a,b)", true).is_err());
        assert!(parse_selector("spec.type=NodePort", false).is_err());
        assert!(parse_selector("metadata.name", false).is_err());
        Ok(())
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn snapshots_undo_later_writes() -> Result<()> {
        let mut state = State::new();
        for name in ["a", "b", "c"] {
            let (kind, key, object) = prepare(service("ns", name, json!({})))?;
            state.apply(kind, key, object);
        }
        let at = state.rv;
        let (kind, key, object) = prepare(service("ns", "b", json!({ "v": "2" })))?;
        state.apply(kind, key, object);
        state.delete(Kind::Service, ("ns".into(), "c".into()));
        let (kind, key, object) = prepare(service("ns", "d", json!({})))?;
        state.apply(kind, key, object);
        let old = state.snapshot(Kind::Service, at).context("snapshot")?;
        let old: Vec<_> = old.iter().map(|o| o["metadata"].clone()).collect();
        assert_eq!(old.len(), 3);
        assert_eq!(old[1]["resourceVersion"], "2");
        assert_eq!(old[2]["name"], "c");
        assert_eq!(state.snapshot(Kind::Node, at).map(|s| s.len()), Some(0));
        state.compact();
        assert!(state.snapshot(Kind::Service, at).is_none());
        Ok(())
    }

    #[test]
    fn filtered_watches_see_objects_enter_and_leave() -> Result<()> {
        let mut state = State::new();
        let filter = Filter::from_query(None, &Query::parse("labelSelector=app%3Dweb"))
            .map_err(|e| anyhow!(e))?;
        for labels in [json!({ "app": "web" }), json!({}), json!({ "app": "web" })] {
            let (kind, key, object) = prepare(service("ns", "s", labels))?;
            state.apply(kind, key, object);
        }
        state.delete(Kind::Service, ("ns".into(), "s".into()));
        let types: Vec<Value> = state
            .lines_after(0, Kind::Service, &filter)
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).map(|v| v["type"].clone()))
            .collect::<Result<_, _>>()?;
        assert_eq!(types, ["ADDED", "DELETED", "ADDED", "DELETED"]);
        Ok(())
    }

    #[test]
    fn apply_stamps_server_fields() -> Result<()> {
        let server = ApiServer::start()?;
        let rv = server.apply(json!({ "kind": "Service", "metadata": { "name": "s" } }))?;
        let (code, object) =
            Client::connect(&server)?.get("/api/v1/namespaces/default/services/s")?;
        assert_eq!(code, 200);
        assert_eq!(object["apiVersion"], "v1");
        assert_eq!(object["metadata"]["resourceVersion"], rv.to_string());
        let uid = object["metadata"]["uid"].clone();
        assert!(uid.is_string());
        server.apply(json!({ "kind": "Service", "metadata": { "name": "s" } }))?;
        let (_, object) = Client::connect(&server)?.get("/api/v1/namespaces/default/services/s")?;
        assert_eq!(object["metadata"]["uid"], uid, "uid survives a replace");
        assert!(
            server
                .apply(json!({ "kind": "Pod", "metadata": { "name": "p" } }))
                .is_err()
        );
        assert!(
            server
                .apply(json!({ "kind": "Node", "metadata": {} }))
                .is_err()
        );
        assert_eq!(server.delete("Service", "default", "nope")?, None);
        assert_eq!(server.delete("Service", "default", "s")?, Some(rv + 2));
        Ok(())
    }

    #[test]
    fn lists_paginate_from_one_snapshot() -> Result<()> {
        let server = ApiServer::start()?;
        for name in ["a", "b", "c", "d", "e"] {
            server.apply(service("ns", name, json!({})))?;
        }
        server.apply(node("n"))?;
        let mut client = Client::connect(&server)?;
        let (code, page) = client.get("/api/v1/services?limit=2")?;
        assert_eq!(code, 200);
        assert_eq!(page["kind"], "ServiceList");
        assert_eq!(names(&page), ["a", "b"]);
        assert_eq!(page["metadata"]["resourceVersion"], "6");
        let token = page["metadata"]["continue"]
            .as_str()
            .context("token")?
            .to_string();
        server.delete("Service", "ns", "c")?;
        let (_, page) = client.get(&format!("/api/v1/services?limit=2&continue={token}"))?;
        assert_eq!(
            names(&page),
            ["c", "d"],
            "the deletion is after the snapshot"
        );
        assert_eq!(page["metadata"]["resourceVersion"], "6");
        let (_, all) = client.get("/api/v1/namespaces/ns/services")?;
        assert_eq!(names(&all), ["a", "b", "d", "e"]);
        assert!(all["metadata"].get("continue").is_none());
        let (_, other) = client.get("/api/v1/namespaces/other/services")?;
        assert_eq!(names(&other), Vec::<&str>::new());
        server.compact();
        let (code, status) = client.get(&format!("/api/v1/services?limit=2&continue={token}"))?;
        assert_eq!((code, status["reason"].as_str()), (410, Some("Expired")));
        let (code, status) = client.get("/api/v1/pods")?;
        assert_eq!((code, status["kind"].as_str()), (404, Some("Status")));
        assert_eq!(server.requests("services"), (5, 0));
        Ok(())
    }

    #[test]
    fn filtered_lists_paginate_over_what_matches() -> Result<()> {
        let server = ApiServer::start()?;
        for (name, app) in [
            ("a", "web"),
            ("b", "db"),
            ("c", "web"),
            ("d", "db"),
            ("e", "web"),
        ] {
            server.apply(service("ns", name, json!({ "app": app })))?;
        }
        let mut client = Client::connect(&server)?;
        let (_, page) = client.get("/api/v1/services?limit=1")?;
        assert_eq!(page["metadata"]["remainingItemCount"], 4);
        let query = "/api/v1/services?limit=2&labelSelector=app%3Dweb";
        let (_, page) = client.get(query)?;
        assert_eq!(names(&page), ["a", "c"]);
        assert!(page["metadata"].get("remainingItemCount").is_none());
        let token = page["metadata"]["continue"].as_str().context("token")?;
        let (_, page) = client.get(&format!("{query}&continue={token}"))?;
        assert_eq!(names(&page), ["e"]);
        assert!(page["metadata"].get("continue").is_none());
        Ok(())
    }

    #[test]
    fn watches_replay_stream_and_close() -> Result<()> {
        let server = ApiServer::start()?;
        server.apply(service("ns", "a", json!({})))?;
        let rv = server.apply(service("ns", "b", json!({})))?;
        server.apply(node("n"))?;
        server.apply(service("ns", "a", json!({ "x": "y" })))?;
        let mut client = Client::connect(&server)?;
        assert_eq!(
            client.send(&format!("/api/v1/services?watch=true&resourceVersion={rv}"))?,
            200
        );
        client.stream_head()?;
        let event = client.event()?.context("event")?;
        assert_eq!(event_summary(&event), ("MODIFIED".into(), "a".into()));
        assert_eq!(event["object"]["kind"], "Service");
        server.delete("Service", "ns", "b")?;
        let event = client.event()?.context("event")?;
        assert_eq!(event_summary(&event), ("DELETED".into(), "b".into()));
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "5");
        server.close_watches();
        assert!(client.event()?.is_none());
        assert_eq!(server.requests("services"), (0, 1));
        Ok(())
    }

    #[test]
    fn watches_from_compacted_versions_expire() -> Result<()> {
        let server = ApiServer::start()?;
        let rv = server.apply(node("n"))?;
        server.compact();
        let mut client = Client::connect(&server)?;
        client.send(&format!("/api/v1/nodes?watch=1&resourceVersion={rv}"))?;
        client.stream_head()?;
        let event = client.event()?.context("event")?;
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
        assert!(client.event()?.is_none());
        // The connection stays usable, and the current RV still works.
        let path = format!(
            "/api/v1/nodes?watch=1&resourceVersion={}",
            server.resource_version()
        );
        client.send(&(path + "&timeoutSeconds=1"))?;
        client.stream_head()?;
        assert!(
            client.event()?.is_none(),
            "ends cleanly after timeoutSeconds"
        );
        Ok(())
    }

    #[test]
    fn node_watch_with_field_selector_and_bookmarks() -> Result<()> {
        let server = ApiServer::start()?;
        server.set_bookmark_interval(Duration::from_millis(50));
        server.apply(node("node-1"))?;
        server.apply(node("node-2"))?;
        let mut client = Client::connect(&server)?;
        let path = "/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dnode-1&allowWatchBookmarks=true";
        client.send(path)?;
        client.stream_head()?;
        let event = client.event()?.context("event")?;
        assert_eq!(event_summary(&event), ("ADDED".into(), "node-1".into()));
        server.apply(node("node-2"))?;
        let rv = server.apply(node("node-1"))?;
        // Bookmarks may come at any point; node-2's change never does.
        let rv_text = rv.to_string();
        let mut events = Vec::new();
        while events.len() < 10 {
            let event = client.event()?.context("event")?;
            let done = event["type"] == "BOOKMARK"
                && event["object"]["metadata"]["resourceVersion"] == rv_text.as_str();
            events.push(event);
            if done {
                break;
            }
        }
        let changes: Vec<_> = events.iter().filter(|e| e["type"] != "BOOKMARK").collect();
        assert_eq!(changes.len(), 1, "{events:?}");
        assert_eq!(
            event_summary(changes[0]),
            ("MODIFIED".into(), "node-1".into())
        );
        let last = events.last().context("no events")?;
        assert_eq!(
            last["object"]["kind"], "Node",
            "the bookmark at {rv} came: {events:?}"
        );
        Ok(())
    }

    #[test]
    fn initial_events_end_with_a_bookmark() -> Result<()> {
        let server = ApiServer::start()?;
        server.apply(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": { "namespace": "ns", "name": "s-abc" },
            "addressType": "IPv4",
            "endpoints": [],
        }))?;
        let mut client = Client::connect(&server)?;
        let path = "/apis/discovery.k8s.io/v1/endpointslices?watch=true&sendInitialEvents=true\
                    &resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true";
        client.send(path)?;
        client.stream_head()?;
        let event = client.event()?.context("event")?;
        assert_eq!(event_summary(&event), ("ADDED".into(), "s-abc".into()));
        let bookmark = client.event()?.context("bookmark")?;
        assert_eq!(bookmark["type"], "BOOKMARK");
        assert_eq!(bookmark["object"]["apiVersion"], "discovery.k8s.io/v1");
        let annotations = &bookmark["object"]["metadata"]["annotations"];
        assert_eq!(annotations["k8s.io/initial-events-end"], "true");
        Ok(())
    }

    #[test]
    fn failing_and_down() -> Result<()> {
        let server = ApiServer::start()?;
        let mut watch = Client::connect(&server)?;
        watch.send("/api/v1/services?watch=true")?;
        watch.stream_head()?;
        server.set_failing(true);
        assert!(watch.event()?.is_none(), "failing closes watches");
        let (code, status) = Client::connect(&server)?.get("/api/v1/services")?;
        assert_eq!(
            (code, status["reason"].as_str()),
            (500, Some("InternalError"))
        );
        server.set_failing(false);
        let mut idle = Client::connect(&server)?;
        assert_eq!(idle.get("/api/v1/services")?.0, 200);
        server.set_down(true)?;
        assert!(TcpStream::connect(server.addr()).is_err());
        assert!(
            idle.get("/api/v1/services").is_err(),
            "idle connections are closed"
        );
        server.set_down(false)?;
        assert_eq!(Client::connect(&server)?.get("/api/v1/services")?.0, 200);
        Ok(())
    }

    #[test]
    fn delay_and_kubeconfig() -> Result<()> {
        let server = ApiServer::start()?;
        server.set_delay(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(Client::connect(&server)?.get("/version")?.0, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let path =
            std::env::temp_dir().join(format!("apiserver-kubeconfig-{}", std::process::id()));
        server.write_kubeconfig(&path)?;
        let config = std::fs::read_to_string(&path)?;
        std::fs::remove_file(&path)?;
        assert!(config.contains(&format!("server: {}\n", server.url())));
        assert!(server.url().starts_with("http://127.0.0.1:"));
        Ok(())
    }
}

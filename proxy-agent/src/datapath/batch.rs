//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (Linux 5.6), which
//! aya 0.14 lacks: reads a hash map thousands of entries per syscall, where
//! aya's iterator takes two syscalls (next key, lookup) per entry, and
//! writes thousands per syscall, where aya's insert writes one.
//!
//! The kernel walks the map bucket by bucket, copying each bucket whole
//! under its lock, and hands back the index of the next bucket as the
//! token for the following call. A walk therefore meets each key at most
//! once and, unlike a key-by-key walk, does not start over when an entry
//! is deleted under it; entries added to buckets already read are missed
//! until the next walk.

use std::{
    borrow::Borrow,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap, MapData},
};

/// Entries asked for per call: few syscalls, buffers of a few hundred KiB.
pub const BATCH: u32 = 4096;

/// The largest batch grown to when one bucket does not fit (`ENOSPC`).
/// Buckets hold a handful of entries; one this large means something is
/// badly wrong, and the caller gets the error.
pub const MAX_BATCH: u32 = 1 << 16;

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `enum bpf_cmd`'s `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel's internal "not supported", which bpf(2) passes through for
/// map types without batch operations; libc does not name it.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    /// Pointer to the token to resume from; 0 starts at the first bucket.
    in_batch: u64,
    /// Pointer to where the kernel writes the token to resume from.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries the buffers hold. Out: entries written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

// The layout of include/uapi/linux/bpf.h.
const _: () = {
    assert!(size_of::<BatchAttr>() == 56);
    assert!(std::mem::offset_of!(BatchAttr, values) == 24);
    assert!(std::mem::offset_of!(BatchAttr, count) == 32);
    assert!(std::mem::offset_of!(BatchAttr, map_fd) == 36);
    assert!(std::mem::offset_of!(BatchAttr, flags) == 48);
};

/// Every entry of `map`, read in batches, stopping once `limit` entries
/// have been read. None: the kernel does not offer the command (older
/// than 5.6), and the caller should walk the map another way.
pub fn lookup_all<T, K, V>(map: &HashMap<T, K, V>, limit: usize) -> io::Result<Option<Vec<(K, V)>>>
where
    T: Borrow<MapData>,
    K: Pod,
    V: Pod,
{
    // SAFETY: aya checked, when it typed the map, that it is a hash map
    // (not per-CPU) whose keys and values are the sizes of K and V.
    unsafe { lookup_fd(map.map().fd().as_fd(), limit) }
}

/// As `lookup_all`, for an array: (index, value) of every index.
pub fn lookup_array<V: Pod>(map: &Array<MapData, V>) -> io::Result<Option<Vec<(u32, V)>>> {
    // SAFETY: aya checked, when it typed the map, that it is an array (not
    // per-CPU), whose keys are u32, of values the size of V.
    unsafe { lookup_fd(map.map().fd().as_fd(), usize::MAX) }
}

/// The batched read of `lookup_all` and `lookup_array`.
///
/// # Safety
///
/// The map behind `fd` must be a hash map or an array (not per-CPU) whose
/// keys and values are the sizes of K and V.
unsafe fn lookup_fd<K: Pod, V: Pod>(
    fd: BorrowedFd,
    limit: usize,
) -> io::Result<Option<Vec<(K, V)>>> {
    let mut buffers = Buffers::new::<K, V>(BATCH);
    let mut cursor = None;
    let mut entries = Vec::new();
    while entries.len() < limit {
        // SAFETY: the caller's promise; the buffers were made for K and V.
        let (outcome, next) = unsafe { buffers.call(fd, cursor) };
        match outcome {
            Outcome::Read(n) => entries.extend(buffers.decode::<K, V>(n)),
            Outcome::Last(n) => {
                entries.extend(buffers.decode::<K, V>(n));
                return Ok(Some(entries));
            }
            Outcome::TooSmall => {
                buffers = Buffers::new::<K, V>(grow(buffers.count).ok_or_else(too_big)?);
                continue;
            }
            Outcome::Unsupported(_) if cursor.is_none() => return Ok(None),
            Outcome::Unsupported(e) | Outcome::Failed(e) => return Err(e),
            Outcome::Stuck => return Err(io::Error::other("the batch read made no progress")),
        }
        cursor = Some(next);
    }
    Ok(Some(entries))
}

/// How far a batched write got: the entries before `written` are in the
/// map, the one at `written` failed with `error`, and those after it were
/// not tried.
#[derive(Debug)]
pub struct Stopped {
    pub written: usize,
    pub error: io::Error,
}

/// Writes `entries` into `map` in order, `BATCH` per call, stopping at the
/// first the kernel refuses (a full map, say). `Ok(false)`: the kernel
/// lacks the command and nothing was written; write them one by one.
pub fn update_all<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: &[(K, V)],
) -> Result<bool, Stopped> {
    // SAFETY: aya checked, when it typed the map, that it is a hash map
    // (not per-CPU) whose keys and values are the sizes of K and V.
    unsafe { update_fd(map.map().fd().as_fd(), entries) }
}

/// As `update_all`, for an array (Linux 5.7 batches them): keys are
/// indices, and one past the end stops the write there.
pub fn update_array<T: Borrow<MapData>, V: Pod>(
    map: &mut Array<T, V>,
    entries: &[(u32, V)],
) -> Result<bool, Stopped> {
    // SAFETY: aya checked, when it typed the map, that it is an array (not
    // per-CPU), whose keys are u32, of values the size of V.
    unsafe { update_fd(map.map().fd().as_fd(), entries) }
}

/// The batched write of `update_all` and `update_array`.
///
/// # Safety
///
/// The map behind `fd` must be a hash map or an array (not per-CPU) whose
/// keys and values are the sizes of K and V.
unsafe fn update_fd<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> Result<bool, Stopped> {
    let mut done = 0;
    for chunk in entries.chunks(BATCH as usize) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        // SAFETY: the caller's promise on the map's kind and sizes.
        let (n, error) = unsafe { update_call(fd, &keys, &values) };
        done += n;
        match error {
            None if n == chunk.len() => {}
            Some(e) if done == 0 && is_unsupported(&e) => return Ok(false),
            error => {
                let error =
                    error.unwrap_or_else(|| io::Error::other("the batch write stopped early"));
                return Err(Stopped {
                    written: done,
                    error,
                });
            }
        }
    }
    Ok(true)
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// One `BPF_MAP_UPDATE_BATCH` of `keys` and `values` (as many of each):
/// how many the kernel wrote, and its error if it stopped.
///
/// # Safety
///
/// The map behind `fd` must be a hash map or an array (not per-CPU) whose
/// keys and values are the sizes of K and V.
unsafe fn update_call<K, V>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    let count = keys.len().min(values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel reads `count` keys and values of the map's sizes,
    // which the slices hold (the caller's promise on the sizes), and
    // writes how many it wrote into the attribute; all live until it
    // returns.
    let rc = unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) };
    let error = (rc != 0).then(io::Error::last_os_error);
    // The kernel reports at most what was asked; never trust more.
    ((attr.count as usize).min(count), error)
}

/// bpf(2) with a batch command.
///
/// # Safety
///
/// Every pointer in `attr` must be valid for what `cmd` reads and writes
/// through it until the call returns.
unsafe fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> libc::c_long {
    // SAFETY: the caller's promise; the attribute is as large as said.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>() as libc::c_uint,
        )
    }
}

fn too_big() -> io::Error {
    io::Error::other(format!(
        "a bucket of the map holds more than {MAX_BATCH} entries"
    ))
}

/// The batch size to retry with when one bucket held more entries than
/// `count`; None past `MAX_BATCH`.
pub fn grow(count: u32) -> Option<u32> {
    let next = count.max(1).checked_mul(2)?;
    (next <= MAX_BATCH).then_some(next)
}

/// What one call did.
#[derive(Debug)]
pub enum Outcome {
    /// `n` entries, and more to come.
    Read(usize),
    /// `n` entries, and the walk is over.
    Last(usize),
    /// A bucket holds more entries than the buffers: retry with larger ones.
    TooSmall,
    /// The kernel lacks the command, or it rejected the call's shape.
    Unsupported(io::Error),
    /// Success without an entry: retrying would loop.
    Stuck,
    Failed(io::Error),
}

/// What a call returning `rc` (with `error` the errno when it is -1) and
/// writing back `count` did.
pub fn outcome(rc: libc::c_long, error: io::Error, count: u32) -> Outcome {
    let n = count as usize;
    if rc == 0 {
        return if n == 0 {
            Outcome::Stuck
        } else {
            Outcome::Read(n)
        };
    }
    match error.raw_os_error() {
        Some(libc::ENOENT) => Outcome::Last(n),
        Some(libc::ENOSPC) => Outcome::TooSmall,
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => Outcome::Unsupported(error),
        _ => Outcome::Failed(error),
    }
}

/// Room for `count` keys and values of one call.
struct Buffers {
    keys: Vec<u8>,
    values: Vec<u8>,
    count: u32,
}

impl Buffers {
    fn new<K, V>(count: u32) -> Buffers {
        let len = |size: usize| size.saturating_mul(count as usize);
        Buffers {
            keys: vec![0; len(size_of::<K>())],
            values: vec![0; len(size_of::<V>())],
            count,
        }
    }

    /// One `BPF_MAP_LOOKUP_BATCH` from the bucket `cursor` (None: the
    /// first); its outcome, and the token to resume from.
    ///
    /// # Safety
    ///
    /// The map behind `fd` must be a hash map (not per-CPU: those return a
    /// value per CPU) of keys and values of the sizes the buffers were made
    /// for.
    unsafe fn call(&mut self, fd: BorrowedFd<'_>, cursor: Option<u32>) -> (Outcome, u32) {
        // Hash maps' tokens are u32 bucket indices.
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: self.count,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the kernel writes at most `count` keys and values of the
        // map's sizes, which the buffers hold (see `new`, and the caller's
        // promise on the sizes), a u32 token to `next`, and `count` into
        // the attribute; it reads a u32 token from `cursor`. All of these
        // live until the call returns.
        let rc = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let error = io::Error::last_os_error();
        // The kernel reports at most what was asked; never trust more.
        let count = attr.count.min(self.count);
        (outcome(rc, error, count), next)
    }

    fn decode<K: Pod, V: Pod>(&self, n: usize) -> impl Iterator<Item = (K, V)> + '_ {
        decode(&self.keys, &self.values, n)
    }
}

/// The first `n` (key, value) pairs of the kernel's arrays of keys and
/// values, each packed at its type's size; fewer if the buffers end first.
pub fn decode<'a, K: Pod, V: Pod>(
    keys: &'a [u8],
    values: &'a [u8],
    n: usize,
) -> impl Iterator<Item = (K, V)> + 'a {
    let keys = keys.chunks_exact(size_of::<K>().max(1)).map(read::<K>);
    let values = values.chunks_exact(size_of::<V>().max(1)).map(read::<V>);
    keys.zip(values).take(n)
}

/// A T from a chunk of exactly its size, at any alignment.
fn read<T: Pod>(chunk: &[u8]) -> T {
    assert!(chunk.len() >= size_of::<T>());
    // SAFETY: the chunk holds size_of::<T>() initialised bytes (asserted),
    // read without regard to alignment, and any bytes are a valid T (Pod).
    unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct Key {
        addr: u32,
        port: u16,
        proto: u8,
        direction: u8,
    }

    // SAFETY: plain integers, no padding.
    unsafe impl Pod for Key {}

    fn bytes<T: Copy>(items: &[T]) -> Vec<u8> {
        let len = std::mem::size_of_val(items);
        // SAFETY: the slice's own memory, read as the bytes it is made of
        // (the test types have no padding).
        unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), len) }.to_vec()
    }

    #[test]
    fn decode_reads_packed_pairs_at_any_alignment() {
        let keys = [
            Key {
                addr: 1,
                port: 80,
                proto: 6,
                direction: 0,
            },
            Key {
                addr: 0xdead_beef,
                port: 443,
                proto: 17,
                direction: 1,
            },
        ];
        let values = [7u64, u64::MAX];
        // One byte in: neither array is aligned for its type.
        let mut key_bytes = vec![0xff];
        key_bytes.extend(bytes(&keys));
        let mut value_bytes = vec![0xff];
        value_bytes.extend(bytes(&values));
        let pairs: Vec<(Key, u64)> = decode(&key_bytes[1..], &value_bytes[1..], 2).collect();
        assert_eq!(pairs, [(keys[0], 7), (keys[1], u64::MAX)]);
    }

    #[test]
    fn decode_takes_only_what_the_kernel_wrote() {
        let keys = bytes(&[1u32, 2, 3, 4]);
        let values = bytes(&[10u16, 20, 30, 40]);
        let pairs: Vec<(u32, u16)> = decode(&keys, &values, 3).collect();
        assert_eq!(pairs, [(1, 10), (2, 20), (3, 30)]);
        assert_eq!(decode::<u32, u16>(&keys, &values, 0).count(), 0);
    }

    #[test]
    fn decode_never_reads_past_the_buffers() {
        let keys = bytes(&[1u32, 2]);
        let values = bytes(&[10u16, 20, 30]);
        let pairs: Vec<(u32, u16)> = decode(&keys, &values, 9).collect();
        assert_eq!(pairs, [(1, 10), (2, 20)]);
        // A trailing partial key is not a key.
        assert_eq!(decode::<u32, u16>(&keys[..7], &values, 9).count(), 1);
    }

    /// Whether a test that needs a kernel map can make one: root, or a
    /// failure under CI=true.
    fn may_create_maps(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test} needs root to create a BPF map; CI=true, so this is a failure"
        );
        eprintln!("NOT RUN: {test} needs root to create a BPF map");
        false
    }

    #[test]
    fn a_batched_write_stops_at_the_first_entry_a_full_map_refuses() {
        if !may_create_maps("a_batched_write_stops_at_the_first_entry_a_full_map_refuses") {
            return;
        }
        let mut map = HashMap::<MapData, u32, u64>::create(8, 0).expect("a hash map of 8");
        let entries: Vec<(u32, u64)> = (0..10).map(|k| (k, u64::from(k) * 3)).collect();
        let stopped = update_all(&mut map, &entries).expect_err("two too many");
        assert_eq!(stopped.written, 8);
        assert_eq!(stopped.error.raw_os_error(), Some(libc::E2BIG));
        for k in 0..8 {
            assert_eq!(map.get(&k, 0).expect("written"), u64::from(k) * 3);
        }
        assert!(map.get(&8, 0).is_err());
        // Keys already there are replaced, even in a full map.
        let again: Vec<(u32, u64)> = (0..8).map(|k| (k, 7)).collect();
        assert!(update_all(&mut map, &again).expect("all replaced"));
        assert_eq!(map.get(&5, 0).expect("replaced"), 7);
    }

    #[test]
    fn a_batched_write_spans_several_calls() {
        if !may_create_maps("a_batched_write_spans_several_calls") {
            return;
        }
        let n = BATCH * 2 + 5;
        let mut map = HashMap::<MapData, u32, u32>::create(n, 0).expect("a hash map");
        let entries: Vec<(u32, u32)> = (0..n).map(|k| (k, !k)).collect();
        assert!(update_all(&mut map, &entries).expect("all written"));
        let read = lookup_all(&map, usize::MAX)
            .expect("read")
            .expect("batch reads");
        assert_eq!(read.len(), n as usize);
        assert!(read.iter().all(|(k, v)| *v == !*k));
    }

    #[test]
    fn batches_double_up_to_the_cap() {
        assert_eq!(grow(BATCH), Some(2 * BATCH));
        assert_eq!(grow(MAX_BATCH / 2), Some(MAX_BATCH));
        assert_eq!(grow(MAX_BATCH), None);
        assert_eq!(grow(u32::MAX), None);
        assert_eq!(grow(0), Some(2));
        let mut steps = 0;
        let mut count = BATCH;
        while let Some(next) = grow(count) {
            count = next;
            steps += 1;
        }
        assert_eq!((count, steps), (MAX_BATCH, 4));
    }

    fn errno(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    #[test]
    fn outcomes_follow_the_kernel_s_return_codes() {
        let ok = || errno(0);
        assert!(matches!(outcome(0, ok(), 4096), Outcome::Read(4096)));
        assert!(matches!(outcome(0, ok(), 0), Outcome::Stuck));
        // The end of the walk still carries the last entries.
        assert!(matches!(
            outcome(-1, errno(libc::ENOENT), 17),
            Outcome::Last(17)
        ));
        assert!(matches!(
            outcome(-1, errno(libc::ENOENT), 0),
            Outcome::Last(0)
        ));
        assert!(matches!(
            outcome(-1, errno(libc::ENOSPC), 0),
            Outcome::TooSmall
        ));
        for e in [libc::EINVAL, libc::EOPNOTSUPP, ENOTSUPP] {
            assert!(
                matches!(outcome(-1, errno(e), 0), Outcome::Unsupported(_)),
                "{e}"
            );
        }
        for e in [libc::EPERM, libc::EBADF, libc::EFAULT, libc::EBUSY] {
            match outcome(-1, errno(e), 0) {
                Outcome::Failed(error) => assert_eq!(error.raw_os_error(), Some(e)),
                other => panic!("errno {e}: {other:?}"),
            }
        }
    }
}

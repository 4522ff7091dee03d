//! Tests that need root say so: under CI=true its absence is a failure,
//! elsewhere the test reports loudly that it did not run.

/// True when the caller may go on; false (after saying so) when it must stop.
/// Panics under CI=true without root.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let why = "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) for BPF programs and network namespaces";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} {why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("NOT RUN: {test} {why}; run the tests as root (`sudo -E cargo xtask test`)");
    false
}

//! `cargo xtask test`: every test, with one total at the end.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
};

use anyhow::{Context, bail};

use crate::build::host_cargo;

/// Runs `cargo test --workspace ARGS`, passing its output through, and ends
/// with the sum of every test binary's "test result" line.
pub fn run(object: &Path, args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    // The integration tests run the agent binary; a filtered `cargo test`
    // (`-- --test e2e`) would not rebuild it and would test a stale one.
    let built = host_cargo(object)
        .args(["build", "-p", "proxy-agent", "--bin", "proxy-agent"])
        .status()
        .context("building the agent")?;
    if !built.success() {
        bail!("building the agent failed: {built}");
    }
    let mut child = host_cargo(object)
        .args(["test", "--workspace"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some((p, f)) = result_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// (passed, failed) of a libtest line "test result: ok. 8 passed; 0 failed; ...".
fn result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let number_before = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    Some((number_before(" passed")?, number_before(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::result_counts;

    #[test]
    fn reads_libtest_summaries() {
        let line = "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(result_counts(line), Some((8, 0)));
        let line = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(result_counts(line), Some((3, 2)));
        assert_eq!(result_counts("running 8 tests"), None);
    }
}

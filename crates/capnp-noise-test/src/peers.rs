//! Tests that need an external peer (`python3` with `noiseprotocol` or
//! `pycapnp`, `capnp`, `openssl`, `ssh-keygen`): one rule for all of them.
//!
//! * Under CI ([`under_ci`]: `CI` is `true` or `1`) a missing peer fails
//!   the test: `.ci/run` installs every peer, so a missing one is a broken
//!   install, not a reason to pass.
//! * Elsewhere the test is skipped, and the skip is never silent: it is
//!   printed at once straight to the process's stderr (past libtest's
//!   output capture, which hides `eprintln!` of a passing test), and when
//!   the test binary exits, its very last line counts and names every test
//!   it skipped, after libtest's own summary.
//!
//! A skipped test still counts as passed in libtest's summary (libtest has
//! no run-time "ignored"): the last line is the truth.

use std::fmt::Display;
use std::io::Write;
use std::sync::{Mutex, Once};

/// True when the tests run under CI: the environment variable `CI` is
/// `true` or `1`. Any other value (unset, empty, `false`, `0`) is not CI.
pub fn under_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// The skips of this test binary: test name and reason.
static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether the current test may go on, given whether the external `peer`
/// is usable (`check`): true if it is. If not: under CI, a panic (the test
/// fails); elsewhere the skip is printed past the capture and recorded for
/// the binary's last line (see the module doc), and false is returned: the
/// test must return at once without asserting anything.
///
/// # Panics
/// Under CI, when `check` is an error.
pub fn usable<E: Display>(peer: &str, check: Result<(), E>) -> bool {
    let Err(why) = check else { return true };
    assert!(
        !under_ci(),
        "{peer} is required when CI is set (`.ci/run` installs it), but is not usable: {why}"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    // Straight to stderr: libtest captures print!/eprint! of a test, and
    // shows it only when the test fails.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs {peer}, which is not usable here ({why})"
    );
    SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(format!("{test} (needs {peer})"));
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(register_summary);
    false
}

/// Prints the binary's last line: every skipped test, counted.
extern "C" fn summary() {
    let mut skipped = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    skipped.sort();
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {} test{} of this binary (they counted as passed above): {}\n",
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" },
        skipped.join(", ")
    );
}

/// Runs [`summary`] when the process exits, after libtest printed its own.
#[allow(unsafe_code)]
fn register_summary() {
    // SAFETY: `atexit` only stores the function pointer; `summary` is an
    // `extern "C" fn()` that never unwinds (its only fallible calls are
    // ignored or cannot panic: a poisoned lock is taken over), and it uses
    // nothing that is gone at exit (a static, and the unbuffered stderr).
    let registered = unsafe { libc::atexit(summary) };
    if registered != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "(cannot register the skip summary: atexit returned {registered})"
        );
    }
}

/// Whether `program args` runs and exits with success: the check for
/// [`usable`] of a peer that has a harmless command (`capnp --version`).
///
/// # Errors
/// Why not: the spawn error, or the exit status and stderr.
pub fn runs(program: &str, args: &[&str]) -> Result<(), String> {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{program}: {e}")),
    }
}

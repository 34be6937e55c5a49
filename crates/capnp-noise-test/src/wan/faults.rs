//! Counting what a fault did (issue 20 item 5): the per-fault table of
//! RELIABILITY.md ([`Tally`]), echo calls that tell an answer from a wrong
//! answer, an error and a hang ([`call_for`]), and the short and long
//! profiles ([`long_profile`], [`runs`]).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::compare::median;
use super::Bed;
use crate::schema::demo_capnp::office;

/// Whether beds can be made here: if not, a test returns (skipped loudly,
/// or failed under `CI=true`: see [`crate::peers::usable`]).
pub fn beds_usable() -> bool {
    crate::peers::usable(
        "network namespaces (root, iproute2, nftables, /dev/net/tun)",
        Bed::check(),
    )
}

static ONE_BED: Mutex<()> = Mutex::new(());

/// One bed at a time in a test process: the tests time delay-bound work,
/// and a 2-core machine running several beds' delayers and servers at
/// once adds its own delays. Hold the guard for the test's length.
pub fn one_bed() -> MutexGuard<'static, ()> {
    ONE_BED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The environment variable that selects the long profile:
/// `CAPNP_NOISE_WAN_PROFILE=long` (anything else, or unset: short).
pub const PROFILE_VAR: &str = "CAPNP_NOISE_WAN_PROFILE";

/// Whether the long profile was asked for ([`PROFILE_VAR`]).
pub fn long_profile() -> bool {
    std::env::var(PROFILE_VAR).is_ok_and(|v| v == "long")
}

/// Runs of a fault: `WAN_RUNS` if set, else `long` in the long profile and
/// `short` in the short one.
pub fn runs(short: usize, long: usize) -> usize {
    std::env::var("WAN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if long_profile() { long } else { short })
}

/// The table's header (markdown), one [`Tally::row`] per line after it.
pub const TABLE_HEAD: &str = "| fault, way | runs | attempted | delivered | lost without an error | errors | time to recover |\n|---|---|---|---|---|---|---|";

/// Per way and fault: what was attempted, what arrived, what was lost
/// without an error, the errors, and the times to recover.
#[derive(Debug, Default)]
pub struct Tally {
    /// Runs made.
    pub runs: usize,
    /// Bytes or calls attempted.
    pub attempted: u64,
    /// Bytes or calls delivered (in order, with the right data).
    pub delivered: u64,
    /// Bytes or calls neither delivered nor reported by an error: must
    /// stay 0.
    pub lost_silently: u64,
    /// The errors reported (each ended its run's transfer or calls).
    pub errors: Vec<String>,
    /// The time each run took to recover (its meaning is the test's).
    pub recover: Vec<Duration>,
}

impl Tally {
    /// The tally as a table row: `what`, then the counts (`unit` after the
    /// attempted count), the first error, the median and longest recovery.
    pub fn row(&self, what: &str, unit: &str) -> String {
        let recover = if self.recover.is_empty() {
            "-".to_string()
        } else {
            let max = self.recover.iter().max().expect("not empty");
            format!(
                "{:.2} s (max {:.2} s)",
                median(&self.recover).as_secs_f64(),
                max.as_secs_f64()
            )
        };
        format!(
            "| {what} | {} | {} {unit} | {} | {} | {} | {recover} |",
            self.runs,
            self.attempted,
            self.delivered,
            self.lost_silently,
            if self.errors.is_empty() {
                "0".to_string()
            } else {
                format!("{}: {}", self.errors.len(), self.errors[0])
            },
        )
    }

    /// Adds what [`call_for`] saw: answered calls are delivered, wrong
    /// answers and hangs are lost without an error.
    pub fn add_calls(&mut self, c: &Calls) {
        self.attempted += c.attempted;
        self.delivered += c.answered;
        self.lost_silently += c.wrong + c.hung;
        self.errors.extend(c.error.clone());
    }
}

/// What [`call_for`] saw.
#[derive(Debug, Default)]
pub struct Calls {
    /// Calls made.
    pub attempted: u64,
    /// Answered with the call's own data.
    pub answered: u64,
    /// Answered with data other than the call's own.
    pub wrong: u64,
    /// Neither answered nor failed within the bound.
    pub hung: u64,
    /// The first error (calls stop there).
    pub error: Option<String>,
    /// When each answer came.
    pub answers: Vec<Instant>,
}

/// Echo calls of 576 bytes, one after another, for `total`; each waits at
/// most `bound` (then it is counted as hung and the calls stop).
pub async fn call_for(office: &office::Client, total: Duration, bound: Duration) -> Calls {
    let end = Instant::now() + total;
    let mut c = Calls::default();
    while Instant::now() < end {
        c.attempted += 1;
        let data = format!("call {} ", c.attempted).repeat(64);
        let mut req = office.echo_request();
        req.get().set_data(data.as_bytes());
        match tokio::time::timeout(bound, req.send().promise).await {
            Err(_) => {
                c.hung += 1;
                break;
            }
            Ok(Err(e)) => {
                c.error = Some(e.to_string());
                break;
            }
            Ok(Ok(reply)) => {
                let same = reply
                    .get()
                    .and_then(|r| r.get_data())
                    .is_ok_and(|d| d == data.as_bytes());
                if same {
                    c.answered += 1;
                    c.answers.push(Instant::now());
                } else {
                    c.wrong += 1;
                }
            }
        }
    }
    c
}

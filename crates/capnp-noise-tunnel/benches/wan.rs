//! The WAN tables of BENCHMARKS.md (issue 20): on a `wan::Bed` (network
//! namespaces, 50 ms RTT), the time to the first answer over plain TCP,
//! capnp-noise, the tunnel and stunnel, and their throughput at 100 Mbit/s
//! with 0.1 % loss; interleaved runs, medians.
//!
//! `cargo bench -p capnp-noise-tunnel --bench wan` (root, iproute2,
//! nftables, stunnel4, openssl). `WAN_RUNS` (default 10) and `WAN_BYTES`
//! (default 32 MiB) size it.

use std::path::Path;
use std::time::Duration;

use capnp_noise_test::wan::compare::{first_answers, median, throughput_table, throughputs, Setup};
use capnp_noise_test::wan::Bed;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then
    // there is nothing to check.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(e) = Bed::check() {
        eprintln!("SKIPPED the WAN benchmark: {e}");
        return;
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_capnp-noise"));
    let runs = env("WAN_RUNS", 10);
    let bytes = env("WAN_BYTES", 32 << 20);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the start: {}", load.trim());

    let rtt = Duration::from_millis(50);
    let bed = Bed::builder().rtt(rtt).build().expect("a bed");
    let setup = Setup::start(&bed, exe);
    println!("\ntime to the first answer, {rtt:?} RTT, {runs} interleaved runs:");
    println!("| way | ms (median) | ms (fastest) | round trips (median / fastest) |");
    println!("|---|---|---|---|");
    for (way, t) in first_answers(&setup, &bed, runs) {
        let (med, min) = (median(&t), *t.iter().min().unwrap());
        let trips = |d: Duration| d.as_secs_f64() / rtt.as_secs_f64();
        println!(
            "| {} | {:.1} | {:.1} | {:.2} / {:.2} |",
            way.name(),
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            trips(med),
            trips(min)
        );
    }
    drop(setup);
    drop(bed);

    let bed = Bed::builder()
        .rtt(rtt)
        .rate_kbit(100_000)
        .loss_per_mille(1)
        .build()
        .expect("a bed");
    let setup = Setup::start(&bed, exe);
    println!(
        "\n{bytes} B transfers, 100 Mbit/s, {rtt:?} RTT, 0.1 % loss, {runs} interleaved runs:"
    );
    print!(
        "{}",
        throughput_table(&throughputs(&setup, &bed, bytes, runs))
    );
    let (carried, overflow) = bed.delayer_counts();
    println!("delayer: {carried} packets carried, {overflow} dropped for a full queue");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
}

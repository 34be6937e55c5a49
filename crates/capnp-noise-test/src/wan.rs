//! A WAN on one machine: an "office" and a "cloud" network namespace joined
//! through a "router" namespace that delays, drops, rate-limits and can cut
//! the traffic between them (issue 20).
//!
//! ```text
//!  office ns            router ns                          cloud ns
//!  eth0 10.77.1.2 ── to-o 10.77.1.1   to-c 10.77.2.1 ── eth0 10.77.2.2
//!                        │    ▲             ▲    │
//!                        └► dly0 (TUN) ─────┘ ◄──┘
//!                           delayer: holds each packet RTT/2 (+ jitter)
//! ```
//!
//! * **Delay and jitter**: this kernel has no `netem`, and no maintained
//!   crate or Debian package delays packets without it (toxiproxy and the
//!   like work on streams, not packets), so the router routes every packet
//!   that arrives from a veth (`ip rule add iif to-o lookup 100`, table
//!   100: `default dev dly0`) into a TUN device. A thread reads each packet,
//!   holds it for half the round trip plus a jitter drawn uniformly from
//!   `[0, jitter]` (never releasing a packet before the one read before it,
//!   so jitter alone reorders nothing), and writes it back into the TUN; the kernel
//!   then routes it on by the main table to its real destination. Both
//!   directions pass the delayer once, so the round trip gains the
//!   configured RTT.
//! * **Reordering and loss bursts** ([`PacketFaults`], seeded, in the
//!   delayer): a packet held back and released right after the next N
//!   packets (in either direction), and bursts in which a run of
//!   consecutive packets is dropped. The delayer decides per packet from
//!   its own seeded generator, so a seed gives the same decisions for the
//!   same packet sequence (nftables' `numgen random` takes no seed).
//! * **Loss**: an nftables rule on the re-injected packets,
//!   `iifname "dly0" numgen random mod 1000 < N drop` (each packet, either
//!   direction, is dropped with probability N/1000).
//! * **Rate**: a `tbf` qdisc on both of the router's veths (its queue holds
//!   one round trip of data at that rate, at least 64 KiB).
//! * **Partition**: an nftables rule dropping everything the router
//!   forwards ([`Bed::partition`]): a silent cut, as on a WAN (no RST, no
//!   ICMP).
//! * **NAT-like idle drop** ([`Bed::drop_idle_flows_after`]): conntrack in
//!   the router forgets a TCP flow after it was idle that long
//!   (`nf_conntrack_tcp_timeout_established`), does not pick up a flow in
//!   mid-stream (`nf_conntrack_tcp_loose = 0`), and `ct state invalid drop`
//!   drops every later packet of it, as a NAT that lost its mapping does.
//!
//! Traffic goes only between the bed's namespaces: they have no route
//! anywhere else. Every bed has namespaces of its own (named after the
//! process and a counter), removed when the [`Bed`] is dropped, even when
//! the test panics; a bed also removes those of beds whose process was
//! killed before it could drop them.
//!
//! Code runs inside a namespace either as a closure on a thread that entered
//! it ([`Bed::spawn_in`], [`Bed::run_async_in`]: sockets it makes belong to
//! that namespace) or as a process ([`Bed::command`]: `ip netns exec`).
//!
//! Needs root, `ip` and `tc` (iproute2), `nft` (nftables) and `/dev/net/tun`;
//! [`Bed::check`] says what is missing (give it to
//! [`crate::peers::usable`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use capnp_noise_test::wan::{Bed, Side};
//!
//! let bed = Bed::builder().rtt(Duration::from_millis(50)).loss_per_mille(1).build().unwrap();
//! let server = bed.run_async_in(Side::Cloud, || async {
//!     let listener = tokio::net::TcpListener::bind((Bed::CLOUD, 7000)).await.unwrap();
//!     listener.accept().await.unwrap().1
//! });
//! bed.run_async_in(Side::Office, || async {
//!     tokio::net::TcpStream::connect((Bed::CLOUD, 7000)).await.unwrap();
//! })
//! .join()
//! .unwrap();
//! assert_eq!(server.join().unwrap().ip(), Bed::OFFICE);
//! ```

pub mod compare;
pub mod faults;

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Where code runs: one of the bed's namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's end: address [`Bed::OFFICE`].
    Office,
    /// The server's end: address [`Bed::CLOUD`].
    Cloud,
    /// Between them: delays, drops, limits.
    Router,
}

/// The settings of a [`Bed`]; made by [`Bed::builder`].
#[derive(Debug, Clone)]
pub struct BedBuilder {
    rtt: Duration,
    jitter: Duration,
    loss_per_mille: u32,
    rate_kbit: Option<u32>,
    seed: u64,
    faults: PacketFaults,
}

/// Seeded reordering and loss bursts the delayer plays on every packet
/// (both directions); all off by default. Set them with
/// [`BedBuilder::packet_faults`] or, while the bed runs,
/// [`Bed::set_packet_faults`] (which restarts the generator from `seed`).
///
/// ```
/// use capnp_noise_test::wan::PacketFaults;
/// // 2 % of packets released after the next 3; 0.5 % start a burst of
/// // 20 dropped packets.
/// let faults = PacketFaults { reorder_per_mille: 20, reorder_depth: 3,
///     burst_per_mille: 5, burst_len: 20, seed: 7 };
/// assert!(faults.any());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketFaults {
    /// Of every 1000 packets, this many are held back and released right
    /// after the next [`reorder_depth`](Self::reorder_depth) packets (or
    /// after [`MAX_HOLD`] if fewer come). One packet is held at a time.
    pub reorder_per_mille: u32,
    /// How many later packets overtake a held one.
    pub reorder_depth: u32,
    /// Of every 1000 packets not already in a burst, this many start a
    /// burst of loss.
    pub burst_per_mille: u32,
    /// Consecutive packets a burst drops (the first included).
    pub burst_len: u32,
    /// The generator's seed.
    pub seed: u64,
}

impl PacketFaults {
    /// Whether any fault is on.
    pub fn any(&self) -> bool {
        (self.reorder_per_mille > 0 && self.reorder_depth > 0)
            || (self.burst_per_mille > 0 && self.burst_len > 0)
    }
}

/// The longest a packet held back for reordering waits for the packets
/// that should overtake it.
pub const MAX_HOLD: Duration = Duration::from_millis(200);

/// The link's state that nftables carries (rewritten whole on each change).
#[derive(Debug, Clone, Copy, Default)]
struct Rules {
    loss_per_mille: u32,
    partitioned: bool,
    idle_drop: bool,
}

/// A running WAN test bed; dropping it stops the delayer and removes the
/// namespaces.
#[derive(Debug)]
pub struct Bed {
    /// office, cloud, router namespace names.
    names: [String; 3],
    rules: Mutex<Rules>,
    delayer: Option<Delayer>,
    rtt: Duration,
    jitter: Duration,
}

/// The delayer's threads and counters.
#[derive(Debug)]
struct Delayer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<DelayerStats>,
}

/// What the delayer saw, and its packet faults (replaced whole, with a new
/// generation, by [`Bed::set_packet_faults`]).
#[derive(Debug, Default)]
struct DelayerStats {
    packets: AtomicUsize,
    overflow: AtomicUsize,
    reordered: AtomicUsize,
    burst_dropped: AtomicUsize,
    faults: Mutex<PacketFaults>,
    generation: AtomicU64,
}

/// What the delayer did: see [`Bed::delayer_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayerCounts {
    /// Packets read from the TUN.
    pub packets: usize,
    /// Dropped because the delayer's queue was full.
    pub overflow: usize,
    /// Held back and released after later ones ([`PacketFaults`]).
    pub reordered: usize,
    /// Dropped in loss bursts ([`PacketFaults`]).
    pub burst_dropped: usize,
}

/// The TUN device's name in the router namespace.
const TUN: &str = "dly0";
/// Packets the delayer holds at most (beyond: dropped, as a full router
/// queue does); 100 Mbit/s for 25 ms is about 210 full-size packets.
const DELAYER_QUEUE: usize = 8192;
/// The routing table of packets that go into the delayer.
const DELAY_TABLE: &str = "100";

static BEDS: AtomicU64 = AtomicU64::new(0);

impl Default for BedBuilder {
    fn default() -> Self {
        BedBuilder {
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            loss_per_mille: 0,
            rate_kbit: None,
            seed: 1,
            faults: PacketFaults::default(),
        }
    }
}

impl BedBuilder {
    /// The round trip the bed adds (half of it each way). Default: none.
    #[must_use]
    pub fn rtt(mut self, rtt: Duration) -> Self {
        self.rtt = rtt;
        self
    }

    /// Extra delay per packet and direction, uniform in `[0, jitter]`
    /// (packets are never reordered). Default: none.
    #[must_use]
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Random loss: each packet, in either direction, is dropped with
    /// probability `n / 1000`. Default: 0.
    #[must_use]
    pub fn loss_per_mille(mut self, n: u32) -> Self {
        self.loss_per_mille = n;
        self
    }

    /// The link's rate in each direction, in kbit/s (`tbf`). Default:
    /// unlimited.
    #[must_use]
    pub fn rate_kbit(mut self, kbit: u32) -> Self {
        self.rate_kbit = Some(kbit);
        self
    }

    /// Reordering and loss bursts from the start (see [`PacketFaults`]).
    /// Default: none.
    #[must_use]
    pub fn packet_faults(mut self, faults: PacketFaults) -> Self {
        self.faults = faults;
        self
    }

    /// The seed of the jitter's random numbers.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Makes the namespaces, links, delayer, qdiscs and rules.
    ///
    /// # Errors
    /// The command or system call that failed, with its message. What was
    /// made up to then is removed.
    pub fn build(self) -> Result<Bed, String> {
        remove_orphans();
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let base = format!("cnwan{}-{n}", std::process::id());
        let mut bed = Bed {
            names: [
                format!("{base}-office"),
                format!("{base}-cloud"),
                format!("{base}-router"),
            ],
            rules: Mutex::new(Rules {
                loss_per_mille: self.loss_per_mille,
                ..Rules::default()
            }),
            delayer: None,
            rtt: self.rtt,
            jitter: self.jitter,
        };
        for name in &bed.names {
            ip(&["netns", "add", name])?;
        }
        let [office, cloud, router] = bed.names.clone();
        for ns in [&office, &cloud, &router] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // No IPv6: nothing but the addresses below is ever sent.
            in_ns(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1")?;
        }
        for (peer_ns, dev, net) in [(&office, "to-o", 1), (&cloud, "to-c", 2)] {
            ip(&[
                "-n", &router, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns",
                peer_ns,
            ])?;
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("10.77.{net}.1/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", &router, "link", "set", dev, "up"])?;
            ip(&[
                "-n",
                peer_ns,
                "addr",
                "add",
                &format!("10.77.{net}.2/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", peer_ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                peer_ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{net}.1"),
            ])?;
        }
        in_ns(
            &router,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
             net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0 \
             net.ipv4.conf.default.send_redirects=0",
        )?;
        bed.delayer = Some(Delayer::start(&bed, &router, self.seed)?);
        bed.set_packet_faults(self.faults);
        ip(&["-n", &router, "link", "set", TUN, "up"])?;
        ip(&[
            "-n",
            &router,
            "route",
            "add",
            "default",
            "dev",
            TUN,
            "table",
            DELAY_TABLE,
        ])?;
        for (dev, pref) in [("to-o", "100"), ("to-c", "101")] {
            ip(&[
                "-n",
                &router,
                "rule",
                "add",
                "iif",
                dev,
                "lookup",
                DELAY_TABLE,
                "pref",
                pref,
            ])?;
        }
        if let Some(kbit) = self.rate_kbit {
            // The queue holds a round trip's worth at this rate (at least
            // 64 KiB); the burst is a few packets (at least rate/250 Hz).
            let bytes_per_s = u64::from(kbit) * 1000 / 8;
            let burst = (bytes_per_s / 250).max(16 * 1024);
            let limit = (bytes_per_s * self.rtt.as_millis().max(20) as u64 / 1000).max(64 * 1024);
            for dev in ["to-o", "to-c"] {
                run(Command::new("ip")
                    .args(["netns", "exec", &router, "tc", "qdisc", "add"])
                    .args([
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{kbit}kbit"),
                        "burst",
                        &burst.to_string(),
                        "limit",
                        &limit.to_string(),
                    ]))?;
            }
        }
        bed.apply_rules()?;
        Ok(bed)
    }
}

impl Bed {
    /// The office's address.
    pub const OFFICE: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
    /// The cloud's address.
    pub const CLOUD: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);

    /// A bed's settings, all off: no delay, no loss, no rate limit.
    pub fn builder() -> BedBuilder {
        BedBuilder::default()
    }

    /// Whether beds can be made here: root, `ip`, `tc`, `nft`,
    /// `/dev/net/tun`, and a namespace made and removed.
    ///
    /// # Errors
    /// What is missing.
    pub fn check() -> Result<(), String> {
        crate::peers::runs("ip", &["-V"])?;
        crate::peers::runs("tc", &["-V"])?;
        crate::peers::runs("nft", &["--version"])
            .map_err(|e| format!("{e} (Debian: apt-get install nftables)"))?;
        crate::peers::runs("sysctl", &["-V"])?;
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun does not exist".into());
        }
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let probe = format!("cnwan{}-{n}-probe", std::process::id());
        ip(&["netns", "add", &probe])
            .map_err(|e| format!("cannot make a network namespace: {e}"))?;
        ip(&["netns", "del", &probe])
    }

    /// The namespace's name (for `ip -n`, `ip netns exec`).
    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Office => &self.names[0],
            Side::Cloud => &self.names[1],
            Side::Router => &self.names[2],
        }
    }

    /// The round trip the bed adds.
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// The most jitter adds to one direction.
    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    /// `program` to run inside `side`'s namespace (`ip netns exec`).
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(side)]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread inside `side`'s namespace: every socket it
    /// makes belongs there.
    ///
    /// # Panics
    /// On the thread (seen at `join`), if it cannot enter the namespace.
    pub fn spawn_in<F, T>(&self, side: Side, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = netns_path(self.ns(side));
        thread::spawn(move || {
            enter(&path).unwrap_or_else(|e| panic!("enter {path}: {e}"));
            f()
        })
    }

    /// Runs the future `f()` makes on a current-thread tokio runtime and
    /// `LocalSet` (capnp-rpc is `!Send`) on a new thread inside `side`'s
    /// namespace; the handle yields its output.
    pub fn run_async_in<F, Fut>(&self, side: Side, f: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.spawn_in(side, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(tokio::task::LocalSet::new().run_until(f()))
        })
    }

    /// Cuts the link (`true`: everything the router would forward is
    /// dropped, silently) or heals it (`false`).
    ///
    /// # Panics
    /// If nft fails.
    pub fn partition(&self, on: bool) {
        self.update(|r| r.partitioned = on);
    }

    /// Changes the random loss to `n / 1000` per packet.
    ///
    /// # Panics
    /// If nft fails.
    pub fn set_loss_per_mille(&self, n: u32) {
        self.update(|r| r.loss_per_mille = n);
    }

    /// Behaves as a NAT that forgets a TCP flow idle for `idle` and then
    /// drops its packets (see the module doc); `None`: no such drop.
    ///
    /// # Panics
    /// If nft or sysctl fails.
    pub fn drop_idle_flows_after(&self, idle: Option<Duration>) {
        if let Some(idle) = idle {
            let secs = idle.as_secs().max(1);
            // The module is loaded by the ct rule; set the timeout once it is.
            self.update(|r| r.idle_drop = true);
            in_ns(
                self.ns(Side::Router),
                &format!(
                    "sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0 \
                     net.netfilter.nf_conntrack_tcp_timeout_established={secs}"
                ),
            )
            .expect("set conntrack timeouts");
        } else {
            self.update(|r| r.idle_drop = false);
        }
    }

    /// Replaces the delayer's reordering and loss bursts (its generator
    /// restarts from `faults.seed`; a packet held back now is still
    /// released).
    pub fn set_packet_faults(&self, faults: PacketFaults) {
        if let Some(d) = &self.delayer {
            *d.stats.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
            d.stats.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// What the delayer has done so far.
    pub fn delayer_stats(&self) -> DelayerCounts {
        self.delayer.as_ref().map_or(DelayerCounts::default(), |d| {
            let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
            DelayerCounts {
                packets: n(&d.stats.packets),
                overflow: n(&d.stats.overflow),
                reordered: n(&d.stats.reordered),
                burst_dropped: n(&d.stats.burst_dropped),
            }
        })
    }

    /// Packets the delayer has carried, and packets it dropped because its
    /// queue was full.
    pub fn delayer_counts(&self) -> (usize, usize) {
        self.delayer.as_ref().map_or((0, 0), |d| {
            (
                d.stats.packets.load(Ordering::Relaxed),
                d.stats.overflow.load(Ordering::Relaxed),
            )
        })
    }

    fn update(&self, change: impl FnOnce(&mut Rules)) {
        change(&mut self.rules.lock().unwrap_or_else(|e| e.into_inner()));
        self.apply_rules().expect("apply nftables rules");
    }

    /// Writes the router's nftables ruleset from `rules`, atomically.
    fn apply_rules(&self) -> Result<(), String> {
        let r = *self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let mut chain = String::new();
        if r.partitioned {
            chain.push_str("    drop\n");
        }
        if r.idle_drop {
            chain.push_str("    ct state invalid drop\n");
        }
        if r.loss_per_mille > 0 {
            chain.push_str(&format!(
                "    iifname \"{TUN}\" numgen random mod 1000 < {} drop\n",
                r.loss_per_mille
            ));
        }
        let ruleset = format!(
            "flush ruleset\ntable inet wan {{\n  chain forward {{\n    \
             type filter hook forward priority 0; policy accept;\n{chain}  }}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns(Side::Router), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft -f failed ({}): {}\nruleset:\n{ruleset}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut d) = self.delayer.take() {
            d.stop.take().map(|s| s.send(()));
            d.reader.take().map(JoinHandle::join);
            d.writer.take().map(JoinHandle::join);
        }
        for name in &self.names {
            // Deleting the router's namespace removes the veths too.
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Delayer {
    /// Opens the TUN device inside `router` and starts the reader (in the
    /// namespace) and the writer.
    fn start(bed: &Bed, router: &str, seed: u64) -> Result<Delayer, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(DELAYER_QUEUE);
        let stats = Arc::new(DelayerStats::default());
        let one_way = bed.rtt / 2;
        let jitter = bed.jitter;
        let path = netns_path(router);
        let reader_stats = Arc::clone(&stats);
        let reader = thread::spawn(move || {
            let tun = enter(&path)
                .and_then(|()| open_tun(TUN))
                .map_err(|e| format!("TUN {TUN} in {path}: {e}"));
            let tun = match tun {
                Ok(tun) => tun,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let writer_file = match tun.try_clone() {
                Ok(f) => f,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("dup TUN: {e}")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(writer_file));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(read_packets(
                tun,
                tx,
                stopped,
                one_way,
                jitter,
                seed,
                reader_stats,
            ));
        });
        let writer_file = ready_rx
            .recv()
            .map_err(|_| "the delayer's reader thread died".to_string())??;
        let writer = thread::spawn(move || write_packets(writer_file, rx));
        Ok(Delayer {
            stop: Some(stop),
            reader: Some(reader),
            writer: Some(writer),
            stats,
        })
    }
}

/// Reads packets from the TUN and queues each with its release time, until
/// `stop`.
async fn read_packets(
    tun: File,
    queue: SyncSender<(Instant, Vec<u8>)>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    one_way: Duration,
    jitter: Duration,
    seed: u64,
    stats: Arc<DelayerStats>,
) {
    let tun = register(tun).expect("register the TUN with tokio");
    let mut rng = seed | 1;
    let mut chaos = Chaos::default();
    let mut last_release = Instant::now();
    let mut buf = vec![0u8; 65536];
    let send = |release: Instant, packet: Vec<u8>| match queue.try_send((release, packet)) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    };
    loop {
        let held_until = chaos.held.as_ref().map(|h| h.until);
        let mut guard = tokio::select! {
            _ = &mut stop => return,
            () = async {
                match held_until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                // Nothing overtook the held packet in time: release it.
                if let Some(h) = chaos.held.take() {
                    last_release = last_release.max(Instant::now());
                    if !send(last_release, h.packet) {
                        return;
                    }
                }
                continue;
            }
            g = tun.readable() => match g { Ok(g) => g, Err(_) => return },
        };
        loop {
            match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => {
                    let now = Instant::now();
                    stats.packets.fetch_add(1, Ordering::Relaxed);
                    chaos.reload(&stats);
                    if chaos.drops() {
                        stats.burst_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let extra = if jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        jitter.mul_f64(unit(&mut rng))
                    };
                    // Never before the packet read before it: jitter alone
                    // reorders nothing.
                    let release = (now + one_way + extra).max(last_release);
                    last_release = release;
                    let packet = buf[..n].to_vec();
                    if chaos.holds() {
                        stats.reordered.fetch_add(1, Ordering::Relaxed);
                        chaos.held = Some(Held {
                            packet,
                            left: chaos.faults.reorder_depth,
                            until: release + MAX_HOLD,
                        });
                        continue;
                    }
                    if !send(release, packet) {
                        return;
                    }
                    if let Some(h) = chaos.overtaken() {
                        if !send(release, h) {
                            return;
                        }
                    }
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => return,
                Err(_would_block) => break,
            }
        }
    }
}

/// A uniform draw in `[0, 1)` from a xorshift64 state.
fn unit(rng: &mut u64) -> f64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng >> 11) as f64 / (1u64 << 53) as f64
}

/// A packet held back until `left` more have gone out (or `until`).
#[derive(Debug)]
struct Held {
    packet: Vec<u8>,
    left: u32,
    until: Instant,
}

/// The delayer's state for [`PacketFaults`].
#[derive(Debug, Default)]
struct Chaos {
    faults: PacketFaults,
    generation: u64,
    rng: u64,
    burst_left: u32,
    held: Option<Held>,
}

impl Chaos {
    /// Takes new faults (and restarts the generator) if they changed.
    fn reload(&mut self, stats: &DelayerStats) {
        let generation = stats.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.faults = *stats.faults.lock().unwrap_or_else(|e| e.into_inner());
            self.rng = self.faults.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            self.burst_left = 0;
        }
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && unit(&mut self.rng) * 1000.0 < f64::from(per_mille)
    }

    /// Whether this packet is dropped by a loss burst (starting one, or
    /// in one).
    fn drops(&mut self) -> bool {
        if self.burst_left > 0 {
            self.burst_left -= 1;
            return true;
        }
        if self.faults.burst_len > 0 && self.chance(self.faults.burst_per_mille) {
            self.burst_left = self.faults.burst_len - 1;
            return true;
        }
        false
    }

    /// Whether this packet is held back (only one is at a time).
    fn holds(&mut self) -> bool {
        self.held.is_none()
            && self.faults.reorder_depth > 0
            && self.chance(self.faults.reorder_per_mille)
    }

    /// After a packet went out: the held one, if enough have overtaken it.
    fn overtaken(&mut self) -> Option<Vec<u8>> {
        let h = self.held.as_mut()?;
        h.left = h.left.saturating_sub(1);
        if h.left == 0 {
            self.held.take().map(|h| h.packet)
        } else {
            None
        }
    }
}

/// Writes each queued packet back into the TUN at its release time, until
/// the reader is gone.
fn write_packets(mut tun: File, queue: Receiver<(Instant, Vec<u8>)>) {
    while let Ok((release, packet)) = queue.recv() {
        let now = Instant::now();
        if release > now {
            thread::sleep(release - now);
        }
        // A packet the kernel refuses is lost, as on a real link.
        let _ = tun.write(&packet);
    }
}

/// `tun` registered with the current tokio reactor.
#[allow(unsafe_code)]
fn register(tun: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    // SAFETY: the `AsyncFd` owns the `File`, so its descriptor stays open
    // and the same for the `AsyncFd`'s whole life (a `File` always returns
    // its own descriptor from `as_raw_fd`).
    unsafe { tokio::io::unix::AsyncFd::register(tun) }.map_err(io::Error::from)
}

fn netns_path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// Moves the calling thread into the network namespace at `path`.
#[allow(unsafe_code)]
fn enter(path: &str) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: `setns` takes a file descriptor that stays open for the call
    // (`ns` lives to the end of this function) and a flag; it changes only
    // the calling thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a new TUN device `name` (no packet information header,
/// non-blocking) in the calling thread's network namespace.
#[allow(unsafe_code)]
fn open_tun(name: &str) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // struct ifreq: the name (16 bytes, NUL-terminated), then the flags
    // (a short) in the union that follows; 40 bytes in all.
    let mut ifreq = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    ifreq[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on
    // Linux) at the pointer; `ifreq` is 40 bytes, lives across the call,
    // and is not otherwise borrowed. The descriptor is open (`file`).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc == 0 {
        Ok(file)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the namespaces of beds whose process is gone (killed before its
/// `Drop` could run): their names are `cnwan<pid>-...`.
fn remove_orphans() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("cnwan")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

/// Runs `sh -c SCRIPT` inside namespace `ns`.
fn in_ns(ns: &str, script: &str) -> Result<(), String> {
    run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
}

/// Runs `cmd` to its end.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

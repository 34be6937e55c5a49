//! `capnp-noise tunnel`: a key-pinned stunnel replacement (see the
//! library's `capnp_noise_tunnel` for what it does).

use std::path::PathBuf;

use capnp_noise_tunnel::config::{LimitsSpec, Mode, Origin, ServiceSpec, TunnelSpec};
use capnp_noise_tunnel::{ShutdownHandle, Tunnel, TunnelConfig};
use tracing::{info, warn};

use super::{CmdResult, Failure, EXIT_BIND, EXIT_USAGE};

const AFTER_HELP: &str = "\
Either `tunnel client ...` or `tunnel server ...` with options (one service),
or `tunnel --config FILE` (several named services; the file's keys are the
options' names with '_' for '-', see the documentation of capnp_noise_tunnel).

Examples:
  # in front of a TCP service on the server machine
  capnp-noise tunnel server --listen 0.0.0.0:4443 --connect 127.0.0.1:4000 \\
      --identity server.key --allow clients.allow
  # on the client machine: applications connect to 127.0.0.1:4000
  capnp-noise tunnel client --listen 127.0.0.1:4000 --connect server.example:4443 \\
      --identity client.key --peer vat1...

At startup the tunnel prints, on stdout:
  vat_id=VATID
  listening service=NAME mode=client|server addr=HOST:PORT connect=HOST:PORT
(one line per service; addr is the bound address, so port 0 shows the port
chosen). Connections are logged on stderr (RUST_LOG, default info).

SIGINT or SIGTERM: stop accepting, let open connections finish within the
grace period (--shutdown-grace, default 30 s), then abort the rest, and exit
0. A second signal aborts at once.

Exit status:
  0  stopped by SIGINT/SIGTERM
  1  runtime failure
  2  invalid command line or configuration (bad VatId, unreadable key or
     allow-list, unknown key in the file, ...)
  3  could not listen on an address (in use, not local, privileged port)";

/// Arguments of `tunnel`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, after_help = AFTER_HELP)]
pub(crate) struct Args {
    /// Run the services described in a TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    side: Option<Side>,
}

#[derive(Debug, clap::Subcommand)]
enum Side {
    /// Listen for plain TCP and carry each connection over capnp-noise to
    /// a server whose VatId is pinned.
    #[command(after_help = AFTER_HELP)]
    Client(ClientArgs),
    /// Listen for capnp-noise connections from allowed vats and forward
    /// each to a plain TCP address.
    #[command(after_help = AFTER_HELP)]
    Server(ServerArgs),
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    #[command(flatten)]
    common: Common,
    /// The server's VatId: any other server is refused (before this side's
    /// VatId is revealed to it).
    #[arg(
        long,
        value_name = "VATID",
        required_unless_present = "known_vats",
        conflicts_with = "known_vats"
    )]
    peer: Option<String>,
    /// Instead of --peer: trust the server's VatId on first use and record
    /// it in FILE (like ssh's known_hosts).
    #[arg(long, value_name = "FILE")]
    known_vats: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    #[command(flatten)]
    common: Common,
    /// Allow the VatIds listed in FILE (one per line; reloaded when it changes).
    #[arg(long, value_name = "FILE", required_unless_present = "allow_vat")]
    allow: Option<PathBuf>,
    /// Allow this VatId (repeatable; with or without --allow).
    #[arg(long = "allow-vat", value_name = "VATID")]
    allow_vat: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Where to listen, HOST:PORT (port 0: a free port, printed at startup).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Where to connect, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    connect: String,
    /// This tunnel's key file (`capnp-noise keygen`).
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
    /// The service's name in logs [default: client or server].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Connections open at once [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Handshakes in progress at once [default: 64].
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Of those, handshakes from one source address [default: 16].
    #[arg(long, value_name = "N")]
    max_handshakes_per_source: Option<usize>,
    /// Seconds a handshake may take [default: 10].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<f64>,
    /// Seconds an outgoing TCP connect may take [default: 10].
    #[arg(long, value_name = "SECS")]
    connect_timeout: Option<f64>,
    /// Seconds open connections get to finish after SIGINT/SIGTERM [default: 30].
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<f64>,
}

impl Side {
    /// The command line as the same settings a configuration file holds.
    fn spec(self) -> TunnelSpec {
        let (mode, common, mut service) = match self {
            Side::Client(a) => {
                let mut s = ServiceSpec::new(Mode::Client, "", "");
                s.peer = a.peer;
                s.known_vats = a.known_vats;
                (Mode::Client, a.common, s)
            }
            Side::Server(a) => {
                let mut s = ServiceSpec::new(Mode::Server, "", "");
                s.allow = a.allow;
                s.allow_vat = a.allow_vat;
                (Mode::Server, a.common, s)
            }
        };
        service.listen = common.listen;
        service.connect = common.connect;
        let mut spec = TunnelSpec::default();
        spec.identity = Some(common.identity);
        spec.shutdown_grace = common.shutdown_grace;
        spec.limits = LimitsSpec::default();
        spec.limits.max_connections = common.max_connections;
        spec.limits.max_handshakes = common.max_handshakes;
        spec.limits.max_handshakes_per_source = common.max_handshakes_per_source;
        spec.limits.handshake_timeout = common.handshake_timeout;
        spec.limits.connect_timeout = common.connect_timeout;
        let name = common.name.unwrap_or_else(|| {
            match mode {
                Mode::Client => "client",
                Mode::Server => "server",
            }
            .into()
        });
        spec.services.insert(name, service);
        spec
    }
}

pub(crate) fn run(args: Args) -> CmdResult {
    let config = match (args.config, args.side) {
        (Some(path), None) => TunnelConfig::load(&path),
        (None, Some(side)) => side.spec().check(Origin::CommandLine),
        _ => {
            return Err(Failure::new(
                EXIT_USAGE,
                "give --config FILE, or `tunnel client` or `tunnel server` with their options \
                 (see `capnp-noise tunnel --help`)",
            )
            .into())
        }
    }
    .map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let tunnel = Tunnel::new(config).map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Before anything is printed: a test (or a supervisor) may signal
        // as soon as it sees the addresses.
        let signals = Signals::new()?;
        let bound = tunnel
            .bind()
            .await
            .map_err(|e| Failure::new(EXIT_BIND, e))?;
        println!("vat_id={}", bound.vat_id());
        for l in bound.listening() {
            let mode = match l.mode {
                Mode::Client => "client",
                Mode::Server => "server",
            };
            println!(
                "listening service={} mode={mode} addr={} connect={}",
                l.name, l.addr, l.connect
            );
        }
        tokio::spawn(signals.drive(bound.shutdown_handle()));
        let stopped = bound.run().await;
        if stopped.aborted > 0 {
            warn!("{} connection(s) were aborted at shutdown", stopped.aborted);
        }
        Ok(())
    })
}

/// SIGINT and SIGTERM: the first shuts down gracefully, the second aborts.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Self> {
        Ok(Signals {})
    }

    #[cfg(unix)]
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }

    async fn drive(mut self, handle: ShutdownHandle) {
        let first = self.next().await;
        info!("{first}: shutting down (a second signal aborts open connections)");
        handle.shutdown();
        let second = self.next().await;
        warn!("{second} again: aborting open connections");
        handle.abort();
    }
}

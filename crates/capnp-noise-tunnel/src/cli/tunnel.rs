//! `capnp-noise tunnel`: a key-pinned stunnel replacement (see the
//! library's `capnp_noise_tunnel` for what it does).

use std::path::PathBuf;

use capnp_noise_tunnel::config::ConfigError;
use capnp_noise_tunnel::config::{Mode, Origin, ServiceSpec, TunnelSpec};
use capnp_noise_tunnel::{ReloadHandle, ShutdownHandle, StartError, Tunnel, TunnelConfig};
use tracing::{info, warn};

use super::{systemd, CmdResult, Failure, EXIT_BIND, EXIT_USAGE};

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
  metrics addr=HOST:PORT          (with --metrics)
  listening service=NAME mode=client|server addr=HOST:PORT connect=HOST:PORT
(one line per service; addr is the bound address, so port 0 shows the port
chosen). Connections are logged on stderr (RUST_LOG, default info; with
--log-format json, one JSON object per line with a timestamp).

SIGINT or SIGTERM: stop accepting, let open connections finish within the
grace period (--shutdown-grace, default 30 s), then abort the rest, and exit
0. A second signal aborts at once.

SIGHUP: read the configuration, the identity key and the allow-lists again;
new connections use them, open ones go on undisturbed. If anything is
wrong (a malformed key, say), the running settings stay and the log says
why. Listen addresses, new services and connection limits need a restart.

Under systemd (Type=notify): READY=1 once every service listens,
STOPPING=1 at shutdown, WATCHDOG=1 at half of WatchdogSec; --listen
systemd:NAME takes the socket passed as FileDescriptorName=NAME. See
contrib/systemd/capnp-noise-tunnel@.service (installed by the .deb as
capnp-noise-tunnel@NAME, which runs /etc/capnp-noise/NAME.toml; an example
file is in /usr/share/doc/capnp-noise-tunnel/examples/).

On Windows: Ctrl-C or Ctrl-Break stops as SIGINT does (closing the console
window or shutting Windows down stops too, but Windows ends the process a
few seconds later); there is no reload (restart instead); unix: and
systemd: addresses are refused when the configuration is checked.

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

/// One service from the command line: the settings of the file format
/// ([`TunnelSpec`] and [`ServiceSpec`]), as options. The options of the
/// other mode are hidden (and refused by the check, as in a file).
#[derive(Debug, clap::Subcommand)]
enum Side {
    /// Listen for plain TCP and carry each connection over capnp-noise to
    /// a server whose VatId is pinned.
    #[command(
        after_help = AFTER_HELP,
        mut_arg("allow", |a| a.hide(true)),
        mut_arg("allow_vat", |a| a.hide(true)),
        mut_arg("proxy_protocol", |a| a.hide(true)),
    )]
    Client(OneService),
    /// Listen for capnp-noise connections from allowed vats and forward
    /// each to a plain TCP address.
    #[command(
        after_help = AFTER_HELP,
        mut_arg("peer", |a| a.hide(true)),
        mut_arg("known_vats", |a| a.hide(true)),
        mut_arg("via", |a| a.hide(true)),
    )]
    Server(OneService),
}

#[derive(Debug, clap::Args)]
struct OneService {
    #[command(flatten)]
    service: ServiceSpec,
    /// The service's name in logs [default: client or server].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    tunnel: TunnelSpec,
}

impl Side {
    /// The command line as the same settings a configuration file holds.
    fn spec(self) -> TunnelSpec {
        let (mode, args) = match self {
            Side::Client(a) => (Mode::Client, a),
            Side::Server(a) => (Mode::Server, a),
        };
        let OneService {
            mut service,
            name,
            mut tunnel,
        } = args;
        service.mode = mode;
        let name = name.unwrap_or_else(|| mode.as_str().into());
        tunnel.services.insert(name, service);
        tunnel
    }
}

/// Where the settings come from, read again on SIGHUP.
enum Source {
    File(PathBuf),
    CommandLine(Box<TunnelSpec>),
}

impl Source {
    /// Reads and checks the settings.
    fn config(&self) -> Result<TunnelConfig, ConfigError> {
        match self {
            Source::File(path) => TunnelConfig::load(path),
            Source::CommandLine(spec) => spec.check(Origin::CommandLine),
        }
    }

    /// Reads the settings, the identity and the trust files again.
    fn tunnel(&self) -> Result<Tunnel, StartError> {
        Tunnel::new(self.config()?)
    }
}

pub(crate) fn run(args: Args) -> CmdResult {
    let source = match (args.config, args.side) {
        (Some(path), None) => Source::File(path),
        (None, Some(side)) => Source::CommandLine(Box::new(side.spec())),
        _ => {
            return Err(Failure::new(
                EXIT_USAGE,
                "give --config FILE, or `tunnel client` or `tunnel server` with their options \
                 (see `capnp-noise tunnel --help`)",
            )
            .into())
        }
    };
    let config = source.config().map_err(|e| Failure::new(EXIT_USAGE, e))?;
    // A long-running tunnel logs its connections.
    super::init_logging("info", config.log_format);
    let tunnel = Tunnel::new(config)
        .map_err(|e| Failure::new(EXIT_USAGE, e))?
        .with_key_log(super::key_log_from_env()?);
    // Before any thread starts: it edits the environment.
    #[cfg(unix)]
    capnp_noise_tunnel::take_systemd_sockets();
    // With worker threads (the default), connections run on them and this
    // thread only accepts, serves the metrics and handles signals.
    let runtime = match tunnel.workers() {
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        // Before anything is printed: a test (or a supervisor) may signal
        // as soon as it sees the addresses.
        let signals = Signals::new()?;
        let bound = tunnel.bind().await.map_err(|e| match e {
            // Threads that cannot start: a runtime failure, not an address.
            StartError::Workers(_) => Failure::new(super::EXIT_FAILURE, e),
            _ => Failure::new(EXIT_BIND, e),
        })?;
        println!("vat_id={}", bound.vat_id());
        if let Some(addr) = bound.metrics_addr() {
            println!("metrics addr={addr}");
        }
        for l in bound.listening() {
            println!(
                "listening service={} mode={} addr={} connect={}",
                l.name, l.mode, l.addr, l.connect
            );
        }
        tokio::spawn(signals.drive(bound.shutdown_handle(), bound.reload_handle(), source));
        systemd::notify("READY=1");
        if let Some(every) = systemd::watchdog_interval() {
            tokio::spawn(systemd::watchdog(every));
        }
        let stopped = bound.run().await;
        if stopped.aborted > 0 {
            warn!("{} connection(s) were aborted at shutdown", stopped.aborted);
        }
        Ok(())
    })
}

/// What a signal asks for.
enum Asked {
    /// SIGINT, SIGTERM (Ctrl-C, Ctrl-Break, a closed console or a system
    /// shutdown on Windows): stop.
    Stop(&'static str),
    /// SIGHUP: reload (Unix only).
    #[cfg_attr(not(unix), allow(dead_code))]
    Reload,
}

/// SIGINT and SIGTERM: the first shuts down gracefully, the second aborts.
/// SIGHUP: reload the settings, the identity and the trust files.
///
/// On Windows (no signals): Ctrl-C and Ctrl-Break in the console stop as
/// SIGINT does; closing the console window, logging off and a system
/// shutdown (`CTRL_CLOSE_EVENT`, `CTRL_SHUTDOWN_EVENT`) stop too, but
/// Windows ends the process a few seconds later whatever the grace
/// period. There is no reload: restart the tunnel to apply new settings.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    ctrl_close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    ctrl_shutdown: tokio::signal::windows::CtrlShutdown,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    #[cfg(windows)]
    fn new() -> std::io::Result<Self> {
        use tokio::signal::windows;
        Ok(Signals {
            ctrl_c: windows::ctrl_c()?,
            ctrl_break: windows::ctrl_break()?,
            ctrl_close: windows::ctrl_close()?,
            ctrl_shutdown: windows::ctrl_shutdown()?,
        })
    }

    #[cfg(unix)]
    async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.term.recv() => Asked::Stop("SIGTERM"),
            _ = self.int.recv() => Asked::Stop("SIGINT"),
            _ = self.hup.recv() => Asked::Reload,
        }
    }

    #[cfg(windows)]
    async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.ctrl_c.recv() => Asked::Stop("Ctrl-C"),
            _ = self.ctrl_break.recv() => Asked::Stop("Ctrl-Break"),
            _ = self.ctrl_close.recv() => Asked::Stop("console closed"),
            _ = self.ctrl_shutdown.recv() => Asked::Stop("system shutdown"),
        }
    }

    async fn drive(mut self, stop: ShutdownHandle, reload: ReloadHandle, source: Source) {
        let mut stopping = false;
        loop {
            match self.next().await {
                Asked::Reload => match source.tunnel() {
                    Ok(tunnel) => {
                        let done = reload.reload(tunnel);
                        info!(
                            vat_id = %done.vat_id,
                            services = %done.applied.join(","),
                            "SIGHUP: reloaded; new connections use the new settings, open ones go on"
                        );
                        for what in done.not_applied {
                            warn!("SIGHUP: not applied: {what}");
                        }
                    }
                    Err(e) => warn!(
                        error = %e,
                        "SIGHUP: reload failed; the running settings stay in use"
                    ),
                },
                Asked::Stop(signal) if !stopping => {
                    systemd::notify("STOPPING=1");
                    info!("{signal}: shutting down (a second signal aborts open connections)");
                    stop.shutdown();
                    stopping = true;
                }
                Asked::Stop(signal) => {
                    warn!("{signal} again: aborting open connections");
                    stop.abort();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_noise_tunnel::config::Problem;
    use clap::Args as _;

    /// The command line and the file are one model: every option of
    /// `tunnel client|server` (but `--name`) is a key of the file, at the
    /// top level or in a service table.
    #[test]
    fn every_option_is_a_key_of_the_file() {
        let cmd = Args::augment_args(clap::Command::new("tunnel"));
        let mut seen = 0;
        for side in ["client", "server"] {
            let sub = cmd.find_subcommand(side).expect("a subcommand");
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "name" | "help") {
                    continue;
                }
                let key = long.replace('-', "_");
                let known = |text: String| {
                    let e = TunnelSpec::from_toml(&text, "t.toml".as_ref());
                    !matches!(e, Err(e) if e.what == Problem::UnknownKey)
                };
                assert!(
                    known(format!("{key} = 0\n")) || known(format!("[service.s]\n{key} = 0\n")),
                    "--{long} is not a key of the file"
                );
                seen += 1;
            }
        }
        assert!(seen >= 2 * 11, "only {seen} options");
    }
}

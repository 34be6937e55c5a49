//! The command line: one module per subcommand.
//!
//! Each subcommand is a variant of [`Command`] holding its module's clap
//! `Args` (or sub-`Command`), and a `run` function in that module. Adding a
//! subcommand means adding a module, one variant, and one match arm.
//!
//! Output conventions: results (a VatId, ...) go to stdout, one per line, so
//! scripts can capture them; messages for people and errors go to stderr.
//! Log output (`tracing`) goes to stderr, filtered by `RUST_LOG`
//! (default `warn`).
//!
//! Exit codes: see [`EXIT_FAILURE`] and [`EXIT_USAGE`]; 0 is success.

use std::process::ExitCode;

use capnp_noise_tunnel::config::LogFormat;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod decode;
mod id;
mod keygen;
mod known_vats;
mod package_files;
mod systemd;
mod tunnel;

/// Exit code for a command that could not do its job (a bad key file, a
/// refused peer, an I/O error, ...). The reason is printed on stderr.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code for a command line clap cannot parse (an unknown subcommand or
/// option, a missing argument). clap prints the usage on stderr.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code for a tunnel that could not listen on an address.
pub(crate) const EXIT_BIND: u8 = 3;

/// An error that exits with a code other than [`EXIT_FAILURE`].
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl Failure {
    pub(crate) fn new(
        code: u8,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Failure {
            code,
            error: error.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Failure {}

/// What a subcommand returns: any error, printed on stderr by [`main`].
pub(crate) type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const AFTER_HELP: &str = "\
Exit status:
  0  success
  1  the command failed (the reason is printed on stderr)
  2  the command line is invalid (usage error), or the tunnel's configuration
  3  the tunnel could not listen on an address

Log messages go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to see more.";

/// capnp-noise: Cap'n Proto RPC over Noise, with Ed25519 vat identities.
#[derive(Debug, Parser)]
#[command(name = "capnp-noise", version, propagate_version = true, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands, one module each.
#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a new identity (an Ed25519 key) and print its VatId.
    Keygen(keygen::Args),
    /// Print the VatId of a key file (PKCS#8 PEM or OpenSSH).
    Id(id::Args),
    /// Manage a known-vats file (trust on first use).
    #[command(subcommand)]
    KnownVats(known_vats::Command),
    /// Run a key-pinned TCP tunnel (an stunnel replacement): `tunnel client`,
    /// `tunnel server`, or `tunnel --config FILE`.
    Tunnel(Box<tunnel::Args>),
    /// Print the capnp-noise connections of a capture (pcap, pcapng, or
    /// two raw streams), decrypted with a key log if one is given.
    Decode(decode::Args),
}

impl Command {
    fn run(self) -> CmdResult {
        match self {
            Command::Keygen(args) => keygen::run(args),
            Command::Id(args) => id::run(args),
            Command::KnownVats(cmd) => known_vats::run(cmd),
            Command::Tunnel(args) => tunnel::run(*args),
            Command::Decode(args) => decode::run(args),
        }
    }
}

/// Parses the command line, runs the subcommand, and maps the outcome to
/// an exit code.
pub(crate) fn main() -> ExitCode {
    // The parser is the documented definition plus the hidden
    // `package-files` (see that module).
    let parsed = Cli::command()
        .subcommand(package_files::command())
        .try_get_matches()
        .and_then(|matches| match matches.subcommand() {
            Some((package_files::NAME, m)) => Ok(Err(m.clone())),
            _ => Cli::from_arg_matches(&matches).map(Ok),
        });
    let cli = match parsed {
        Ok(Ok(cli)) => cli,
        Ok(Err(package)) => {
            init_logging("warn", LogFormat::Text);
            return report(package_files::run(&package, Cli::command()));
        }
        Err(e) => {
            // Usage errors go to stderr; --help and --version to stdout.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The tunnel sets up its logs once its configuration is read.
    if !matches!(cli.command, Command::Tunnel(_)) {
        init_logging("warn", LogFormat::Text);
    }
    report(cli.command.run())
}

/// The exit code of a subcommand's outcome; an error is printed on stderr.
fn report(outcome: CmdResult) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capnp-noise: error: {e}");
            let code = e.downcast_ref::<Failure>().map_or(EXIT_FAILURE, |f| f.code);
            ExitCode::from(code)
        }
    }
}

/// The key log `CAPNP_NOISE_KEYLOG` names, if it is set: opened for
/// appending (created 0600), with a loud warning on stderr. The library
/// never reads the variable; this command (and the examples) do.
pub(crate) fn key_log_from_env() -> Result<
    Option<std::sync::Arc<dyn capnp_noise::keylog::KeyLog>>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    use capnp_noise::keylog::{KeyLogFile, KEYLOG_ENV};
    let Some(path) = std::env::var_os(KEYLOG_ENV).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let file = KeyLogFile::create(&path).map_err(|e| {
        format!(
            "{KEYLOG_ENV}={}: cannot open the key log: {e}",
            path.to_string_lossy()
        )
    })?;
    eprintln!(
        "capnp-noise: WARNING: {KEYLOG_ENV} is set: the Noise session keys are written to {}; \
         whoever reads that file can decrypt these sessions. For research and debugging only.",
        path.to_string_lossy()
    );
    Ok(Some(std::sync::Arc::new(file)))
}

/// Logs to stderr, filtered by RUST_LOG (else `default_level`): as text
/// without time, or as JSON lines with an RFC 3339 timestamp.
pub(crate) fn init_logging(default_level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .without_time()
            .try_init(),
        LogFormat::Json => logs.json().with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every visible subcommand, as its path of names from the root
    /// (`["tunnel", "client"]`), with the command; not clap's own `help`.
    fn visible_subcommands(
        cmd: &clap::Command,
        path: Vec<String>,
        out: &mut Vec<(Vec<String>, clap::Command)>,
    ) {
        let ours = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in ours {
            let mut path = path.clone();
            path.push(sub.get_name().to_string());
            out.push((path.clone(), sub.clone()));
            visible_subcommands(sub, path, out);
        }
    }

    /// The visible long options of `cmd` (`--help` and `--version` too).
    fn visible_longs(cmd: &clap::Command) -> Vec<String> {
        cmd.get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect()
    }

    /// The manual pages and completions the .deb carries mention every
    /// subcommand and every option of the clap definition, each in its
    /// own page; and the hidden `package-files` appears in none of them.
    #[test]
    fn man_pages_and_completions_cover_every_subcommand_and_option() {
        let dir = tempfile::tempdir().unwrap();
        package_files::write(Cli::command(), dir.path()).unwrap();
        let mut root = Cli::command();
        root.build();
        let mut subs = Vec::new();
        visible_subcommands(&root, Vec::new(), &mut subs);
        let names: Vec<&str> = subs.iter().map(|(p, _)| p[0].as_str()).collect();
        for expected in ["keygen", "id", "known-vats", "tunnel"] {
            assert!(names.contains(&expected), "{expected} not among {names:?}");
        }
        let read = |path: std::path::PathBuf| {
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                // roff writes a hyphen as \-
                .replace("\\-", "-")
        };
        let scripts: Vec<(&str, String)> = package_files::SHELLS
            .iter()
            .map(|(_, file)| (*file, read(dir.path().join("completions").join(file))))
            .collect();
        let mut pages = vec![(Vec::new(), root.clone())];
        pages.extend(subs.iter().cloned());
        let mut options = 0;
        for (path, cmd) in &pages {
            let stem = std::iter::once("capnp-noise".to_string())
                .chain(path.iter().cloned())
                .collect::<Vec<_>>()
                .join("-");
            let page = read(dir.path().join("man").join(format!("{stem}.1")));
            for long in visible_longs(cmd) {
                assert!(
                    page.contains(&format!("--{long}")),
                    "--{long} not in {stem}.1"
                );
                for (file, script) in &scripts {
                    // fish writes `-l listen`, bash and zsh `--listen`.
                    let token = if file.ends_with(".fish") {
                        format!("-l {long}")
                    } else {
                        format!("--{long}")
                    };
                    assert!(script.contains(&token), "{token} ({stem}) not in {file}");
                }
                options += 1;
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = sub.get_name();
                assert!(page.contains(name), "{name} not in {stem}.1");
                for (file, script) in &scripts {
                    assert!(script.contains(name), "subcommand {name} not in {file}");
                }
            }
        }
        assert!(options > 30, "only {options} options were checked");
        let hidden = package_files::NAME;
        for (file, script) in &scripts {
            assert!(!script.contains(hidden), "{hidden} in {file}");
        }
        for page in std::fs::read_dir(dir.path().join("man")).unwrap() {
            let page = page.unwrap().path();
            assert!(!read(page.clone()).contains(hidden), "{}", page.display());
        }
    }
}

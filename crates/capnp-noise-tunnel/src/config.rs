//! The tunnel's settings: as written ([`TunnelSpec`], from a TOML file or
//! the command line) and as checked ([`TunnelConfig`]).
//!
//! One model serves both sources: the fields of [`TunnelSpec`],
//! [`ServiceSpec`] and [`LimitsSpec`] are the TOML keys, and (through
//! `clap`'s derive, `_` written `-`) the command-line options. One function,
//! [`TunnelSpec::check`], turns a spec into a [`TunnelConfig`] or explains
//! what is wrong with a [`ConfigError`].
//!
//! # Errors never quote the configuration
//!
//! A configuration file may hold a private key pasted into the wrong place,
//! and a parser's message quotes what it did not understand. So a
//! [`ConfigError`] is built only from the file's name, a line and column,
//! the name of the setting (a known key, a service name of the documented
//! form, or an unknown key's name when it is short and plain) and a fixed
//! phrase ([`Problem`]): never the value written, never the TOML parser's
//! message. The line and column say where to look.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::net::Ipv6Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use capnp_noise::vat_id::VatId;
use capnp_noise::wire::Suite;

pub use crate::egress::Via;
pub use crate::proxy::ProxyProtocol;

/// Default [`LimitsConfig::max_connections`]: 1024 per service.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`LimitsConfig::max_handshakes`]: 64 per service.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default [`LimitsConfig::max_handshakes_per_source`]: 16 per service and source address.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize =
    capnp_noise::admission::DEFAULT_MAX_HANDSHAKES_PER_SOURCE;
/// Default [`LimitsConfig::max_unauthenticated_per_source`]: 64 per service
/// and source address.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize =
    capnp_noise::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE;
/// Default [`LimitsConfig::handshake_timeout`]: 10 seconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`LimitsConfig::connect_timeout`]: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`TunnelConfig::shutdown_grace`]: 30 seconds.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The most [`TunnelConfig::workers`].
pub const MAX_WORKERS: usize = 1024;

/// Default [`ServiceConfig::listen_mode`]: only the tunnel's user.
pub const DEFAULT_LISTEN_MODE: u32 = 0o600;

/// The largest accepted connection or handshake limit.
pub const MAX_COUNT: usize = 1_000_000;
/// The longest accepted timeout: one day.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The longest service name.
pub const MAX_SERVICE_NAME: usize = 64;
/// The largest configuration file read.
pub const MAX_CONFIG_FILE_LEN: u64 = 1024 * 1024;
/// The longest unknown key whose name an error shows (see
/// [`ConfigError::key`]).
const MAX_SHOWN_UNKNOWN_KEY: usize = 32;

/// The tunnel's settings as written, before [`check`](Self::check).
///
/// Read from the TOML file format by [`from_toml`](Self::from_toml), or
/// filled from the command line (the fields are `clap` options). Durations
/// are in seconds (integer or fractional). The limits given here are the
/// defaults of every service.
#[derive(Debug, Clone, Default, clap::Args)]
#[non_exhaustive]
pub struct TunnelSpec {
    /// This tunnel's key file (`capnp-noise keygen`).
    #[arg(long, value_name = "FILE", required = true)]
    pub identity: Option<PathBuf>,
    /// Seconds open connections get to finish after SIGINT/SIGTERM [default: 30].
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace: Option<f64>,
    /// How log lines (on stderr) are written: text (without time: the
    /// service manager adds it) or json (one object per line, with an
    /// RFC 3339 timestamp) [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve /metrics (Prometheus text format) and /status (200, or 503 when
    /// a service's connect address cannot be reached) over HTTP on ADDR,
    /// HOST:PORT (port 0: a free port, printed at startup). No
    /// authentication: use a loopback address [default: none].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Threads that run the connections, each a single-threaded runtime
    /// (a connection stays on the one it was given, the least loaded);
    /// 0: every connection on one multi-threaded runtime instead
    /// [default: one per core].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Default limits of the services.
    #[arg(skip)]
    pub limits: LimitsSpec,
    /// The services by name (`[service.NAME]` tables).
    #[arg(skip)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Where each key was written, when read from a file.
    #[arg(skip)]
    written_at: Positions,
}

/// Connection limits as written; each `None` takes the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, clap::Args)]
#[non_exhaustive]
pub struct LimitsSpec {
    /// Connections open at once, per service [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Handshakes in progress at once, per service [default: 64].
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// Of those, handshakes from one source address [default: 16].
    #[arg(long, value_name = "N")]
    pub max_handshakes_per_source: Option<usize>,
    /// Server: connections not yet authenticated from one source address;
    /// more are closed at accept [default: 64].
    #[arg(long, value_name = "N")]
    pub max_unauthenticated_per_source: Option<usize>,
    /// Seconds a handshake may take [default: 10].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<f64>,
    /// Seconds an outgoing TCP connect may take [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Send an authenticated keepalive (an empty frame the other end reads
    /// as nothing) in each interval of SECS in which nothing else was sent
    /// over capnp-noise, so that NATs and load balancers keep an idle
    /// connection; 0: none [default: 0].
    #[arg(long, value_name = "SECS")]
    pub keepalive: Option<f64>,
    /// Close a connection over which no data went either way for SECS
    /// (keepalives do not count): its plain side is reset; 0: never
    /// [default: 0].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<f64>,
}

/// How the tunnel writes its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, without time.
    #[default]
    Text,
    /// One JSON object per line, with a timestamp.
    Json,
}

/// The cipher suite a service uses over capnp-noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SuiteChoice {
    /// A client proposes the faster suite for its CPU (AES-GCM with AES
    /// instructions, else ChaCha20-Poly1305), and retries once with
    /// ChaCha20-Poly1305 (the mandatory suite) if the server closes without
    /// answering AES-GCM (SPEC.md 2); a server accepts both.
    Auto,
    /// Only `Noise_XX_25519_ChaChaPoly_BLAKE2s`.
    #[value(name = "chachapoly")]
    ChaChaPoly,
    /// Only `Noise_XX_25519_AESGCM_SHA256`.
    #[value(name = "aesgcm")]
    AesGcm,
}

impl SuiteChoice {
    /// The one suite chosen, or `None` for [`Auto`](Self::Auto).
    pub fn suite(self) -> Option<Suite> {
        match self {
            SuiteChoice::Auto => None,
            SuiteChoice::ChaChaPoly => Some(Suite::ChaChaPolyBlake2s),
            SuiteChoice::AesGcm => Some(Suite::AesGcmSha256),
        }
    }

    /// `"auto"`, `"chachapoly"` or `"aesgcm"`, as the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SuiteChoice::Auto => "auto",
            SuiteChoice::ChaChaPoly => "chachapoly",
            SuiteChoice::AesGcm => "aesgcm",
        }
    }
}

/// Which end of the tunnel a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Accepts plain TCP locally and connects over capnp-noise.
    Client,
    /// Accepts capnp-noise and connects over plain TCP.
    Server,
}

impl Mode {
    /// `"client"` or `"server"`, as the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Client => "client",
            Mode::Server => "server",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One service as written.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct ServiceSpec {
    /// `client` or `server` (on the command line: the subcommand).
    #[arg(skip = Mode::Client)]
    pub mode: Mode,
    /// Where to listen, HOST:PORT (port 0: a free port, printed at startup);
    /// a client may listen on a Unix socket, unix:/PATH; systemd:NAME takes
    /// the socket systemd passes under that name (socket activation).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Where to connect, HOST:PORT; a server may connect to a Unix socket,
    /// unix:/PATH.
    #[arg(long, value_name = "ADDR")]
    pub connect: String,
    /// The permissions of a unix: listening socket, in octal: who may
    /// connect (and use this tunnel's identity) [default: 600, the tunnel's
    /// user only].
    #[arg(long, value_name = "MODE", value_parser = octal_mode)]
    pub listen_mode: Option<u32>,
    /// Client: the server's VatId; any other server is refused (before this
    /// side's VatId is revealed to it). Repeatable (in the file: a list),
    /// e.g. the old and the new key during a key rotation.
    #[arg(long, value_name = "VATID")]
    pub peer: Vec<String>,
    /// Client, instead of the peer: trust the server's VatId on first use
    /// and record it in FILE (like ssh's known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_vats: Option<PathBuf>,
    /// Server: allow the VatIds listed in FILE (one per line; reloaded when
    /// it changes).
    #[arg(long, value_name = "FILE")]
    pub allow: Option<PathBuf>,
    /// Server: allow this VatId (repeatable; with or without an allow-list).
    #[arg(long = "allow-vat", value_name = "VATID")]
    pub allow_vat: Vec<String>,
    /// Server: send the target a PROXY protocol header before the data: v1
    /// (the client tunnel's address) or v2 (its address and, in TLV 0xE0,
    /// its authenticated VatId) [default: none].
    #[arg(long, value_name = "VERSION")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Client: reach the server through a proxy, http://HOST:PORT (HTTP
    /// CONNECT) or socks5://HOST:PORT (no proxy authentication) [default:
    /// direct].
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,
    /// The cipher suite: a client proposes only it, a server accepts only
    /// it (and refuses others by closing); auto: a client proposes the
    /// faster one for its CPU (and if the server closes without answering,
    /// retries once with the mandatory chachapoly, and logs it), a server
    /// accepts both [default: auto].
    #[arg(long, value_name = "SUITE")]
    pub suite: Option<SuiteChoice>,
    /// Resume with the other end (Noise IK, SPEC.md 14). A client keeps,
    /// in memory, the server it completed a handshake with (its `peer`),
    /// and opens later connections to it with IK; a server answers IK
    /// (without this it answers a resuming client with the XX fallback,
    /// at XX's cost). On its own this saves no round trip (see
    /// early_data) [default: off].
    #[arg(long)]
    pub resumption: bool,
    /// With resumption, a REPLAY RISK the operator takes on: a client sends
    /// the first bytes its plain client sends (what arrives within 50 ms,
    /// then until 5 ms pass without more; at most 100 ms and about 3.8 KB)
    /// inside IK message 1, and a server passes such
    /// early data to its target at once, saving a round trip. Anyone who
    /// recorded that first flight can send it again, and the server's
    /// target then receives those first bytes again, once per replay; they
    /// are also not forward secret. Only for protocols whose first request
    /// is safe to run twice (a read), never one that changes anything
    /// [default: off].
    #[arg(long)]
    pub early_data: bool,
    /// Limits of this service (overriding the file's defaults).
    #[command(flatten)]
    pub limits: LimitsSpec,
}

impl ServiceSpec {
    /// A service of the given mode with nothing else set.
    pub fn new(mode: Mode, listen: impl Into<String>, connect: impl Into<String>) -> Self {
        ServiceSpec {
            mode,
            listen: listen.into(),
            connect: connect.into(),
            listen_mode: None,
            peer: Vec::new(),
            known_vats: None,
            allow: None,
            allow_vat: Vec::new(),
            proxy_protocol: None,
            via: None,
            suite: None,
            resumption: false,
            early_data: false,
            limits: LimitsSpec::default(),
        }
    }
}

/// Where a [`TunnelSpec`] came from, to name settings in errors the way the
/// user wrote them.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A TOML file; relative paths in it are relative to its directory.
    File(&'a Path),
    /// The command line; relative paths are relative to the working directory.
    CommandLine,
}

impl Origin<'_> {
    fn resolve(&self, path: &Path) -> PathBuf {
        match self {
            Origin::File(file) if path.is_relative() => file
                .parent()
                .map_or_else(|| path.to_path_buf(), |dir| dir.join(path)),
            _ => path.to_path_buf(),
        }
    }
}

/// A line and a column in a file, both from 1 (the column counts
/// characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1, in characters.
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` of `text`, if it is within it.
    fn of(text: &str, offset: usize) -> Option<Position> {
        let before = text.get(..offset)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Some(Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        })
    }
}

/// Key paths (`service.db.peer`, `service.db.allow_vat[1]`) and where
/// their values were written (for `service.NAME`: the name). Not part of the spec's value: its `Debug` shows nothing.
#[derive(Clone, Default)]
struct Positions(BTreeMap<String, Position>);

impl fmt::Debug for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("..")
    }
}

/// What is wrong with a setting: a fixed phrase, never a value from the
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The configuration file cannot be read.
    Unreadable(io::ErrorKind),
    /// The configuration file is larger than [`MAX_CONFIG_FILE_LEN`].
    TooLarge,
    /// The configuration file is not UTF-8.
    NotUtf8,
    /// The file is not valid TOML at this position.
    Syntax,
    /// A key the tunnel does not know.
    UnknownKey,
    /// A value of the wrong type; says which type is expected.
    Expected(&'static str),
    /// A required setting is missing; says what it is.
    Missing(&'static str),
    /// No `[service.NAME]` table (or none on the command line).
    NoService,
    /// A service name not of the documented form.
    ServiceName,
    /// An address not of the form `HOST:PORT`; says why.
    Address(&'static str),
    /// A value that is not a VatId.
    NotAVatId,
    /// A number out of its range; says the range.
    OutOfRange(&'static str),
    /// A setting of the other mode (`allow` in a client service, ...).
    WrongMode(Mode),
    /// A setting that only applies to a `unix:` listening address.
    NotUnix,
    /// A client with both `peer` and `known_vats`.
    PeerAndKnownVats,
    /// A service with no trust setting at all.
    NoTrust(Mode),
    /// `early_data` without `resumption`.
    EarlyDataWithoutResumption,
    /// A client with `resumption` and `known_vats` (it resumes with a
    /// pinned `peer` only).
    ResumptionWithoutPeer,
}

/// The range of counts, as errors state it.
const COUNT_RANGE: &str = "a whole number from 1 to 1000000";
/// The range of durations that may be off, as errors state it.
const OPTIONAL_SECONDS_RANGE: &str =
    "0 (none), or a number of seconds, at least a nanosecond and at most 86400 (a day)";
/// The range of durations, as errors state it.
const SECONDS_RANGE: &str = "a number of seconds, at least a nanosecond and at most 86400 (a day)";

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(kind) => write!(f, "cannot be read ({kind})"),
            Problem::TooLarge => write!(
                f,
                "is larger than {MAX_CONFIG_FILE_LEN} bytes; is it the right file?"
            ),
            Problem::NotUtf8 => f.write_str("is not UTF-8 text"),
            Problem::Syntax => f.write_str("this is not valid TOML (see https://toml.io)"),
            Problem::UnknownKey => f.write_str(
                "unknown key (the keys are the options of `capnp-noise tunnel client|server --help`, '_' for '-')",
            ),
            Problem::Expected(what) => write!(f, "expected {what}"),
            Problem::Missing(what) => write!(f, "missing: {what}"),
            Problem::NoService => {
                f.write_str("no service is configured; add a [service.NAME] table")
            }
            Problem::ServiceName => write!(
                f,
                "invalid service name: use 1 to {MAX_SERVICE_NAME} letters, digits, '-', '_' and '.'"
            ),
            Problem::Address(why) => write!(f, "not a valid address: {why}"),
            Problem::NotAVatId => f.write_str(
                "this is not a VatId (one starts with \"vat1\"; `capnp-noise id KEYFILE` prints it); \
                 the value is not shown in case it is a secret",
            ),
            Problem::OutOfRange(range) => write!(f, "out of range: {range}"),
            Problem::WrongMode(mode) => write!(
                f,
                "only applies to a {} service, and this one is a {mode}",
                match mode {
                    Mode::Client => Mode::Server,
                    Mode::Server => Mode::Client,
                }
            ),
            Problem::NotUnix => f.write_str("only applies to a unix: listen address"),
            Problem::PeerAndKnownVats => f.write_str(
                "peer and known_vats exclude each other: pin the server's VatId, or trust it on first use",
            ),
            Problem::NoTrust(Mode::Client) => f.write_str(
                "a client service needs peer (the server's VatId) or known_vats (a trust-on-first-use file)",
            ),
            Problem::NoTrust(Mode::Server) => f.write_str(
                "a server service needs allow (an allow-list file) and/or allow_vat (allowed VatIds)",
            ),
            Problem::EarlyDataWithoutResumption => {
                f.write_str("early_data needs resumption (early data travels in IK message 1)")
            }
            Problem::ResumptionWithoutPeer => f.write_str(
                "a client resumes only with a pinned peer (the server's VatId), not with known_vats",
            ),
        }
    }
}

/// An invalid configuration: where (file, line, column), which setting,
/// and what is wrong.
///
/// Its text is `FILE: line L, column C: KEY: PROBLEM` (parts unknown are
/// left out), or `--OPTION: PROBLEM` for the command line. It never holds
/// a value from the configuration (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The configuration file, if the settings came from one.
    pub file: Option<PathBuf>,
    /// Where in the file, when the problem has a place.
    pub position: Option<Position>,
    /// The setting: a key path as the file writes it (`service.db.peer`),
    /// or a command-line option (`--peer`). Its parts are known key names,
    /// service names of the documented form, and unknown keys' names only
    /// when they are at most 32 lowercase letters, digits and `_`.
    pub key: Option<String>,
    /// What is wrong.
    pub what: Problem,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            sep = ": ";
        }
        if let Some(p) = self.position {
            write!(f, "{sep}line {}, column {}", p.line, p.column)?;
            sep = ": ";
        }
        if let Some(key) = &self.key {
            write!(f, "{sep}{key}")?;
            sep = ": ";
        }
        write!(f, "{sep}{}", self.what)
    }
}

impl std::error::Error for ConfigError {}

/// The checked settings of a tunnel process.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TunnelConfig {
    /// The key file of the tunnel's identity.
    pub identity: PathBuf,
    /// How long open connections may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where the metrics and status endpoint listens, if anywhere.
    pub metrics: Option<String>,
    /// Threads that run the connections, each a current-thread tokio
    /// runtime (`capnp_noise::workers::Workers`); 0: connections are spawned
    /// on the runtime that runs [`BoundTunnel::run`](crate::BoundTunnel::run)
    /// (the CLI then makes it multi-threaded). Taken at start; a reload
    /// does not change it.
    pub workers: usize,
    /// The services, sorted by name.
    pub services: Vec<ServiceConfig>,
}

/// One checked service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// Its name (letters, digits, `-`, `_`, `.`), used in logs.
    pub name: String,
    /// The address to listen on (`HOST:PORT`, or `unix:/PATH` for a client).
    pub listen: String,
    /// The address to connect to (`HOST:PORT`, or `unix:/PATH` for a
    /// server).
    pub connect: String,
    /// The permissions of a Unix listening socket.
    pub listen_mode: u32,
    /// Which end of the tunnel, and whom it trusts.
    pub trust: Trust,
    /// Server mode: the PROXY protocol header sent to the target first.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Client mode: the proxy the server is reached through.
    pub via: Option<Via>,
    /// The one suite used (proposed by a client, accepted by a server);
    /// `None`: the library's choice (a client proposes [`Suite::preferred`],
    /// a server accepts every suite).
    pub suite: Option<Suite>,
    /// Resumption (Noise `IK`, SPEC.md 14): a client resumes with its pinned
    /// server once it knows it, a server answers `IK`.
    pub resumption: bool,
    /// Early data (only with `resumption`): a client sends its plain
    /// client's first bytes in `IK` message 1, a server passes them on at
    /// once. **Replayable** by anyone who recorded the first flight, and
    /// not forward secret (SPEC.md 14.5): an operator's explicit choice.
    pub early_data: bool,
    /// Its limits.
    pub limits: LimitsConfig,
    /// Where its handshakes write their secrets (research only; see
    /// `capnp_noise::keylog`). Never from the configuration file: the
    /// `capnp-noise` command sets it from `CAPNP_NOISE_KEYLOG`
    /// ([`Tunnel::with_key_log`](crate::Tunnel::with_key_log)).
    pub key_log: Option<Arc<dyn capnp_noise::keylog::KeyLog>>,
}

impl ServiceConfig {
    /// Whether this service is a client or a server.
    pub fn mode(&self) -> Mode {
        match self.trust {
            Trust::PinnedServer(_) | Trust::KnownVats(_) => Mode::Client,
            Trust::AllowedClients { .. } => Mode::Server,
        }
    }
}

/// Whom a service accepts on the capnp-noise side.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Client mode: only the server with this VatId.
    PinnedServer(Vec<VatId>),
    /// Client mode: trust on first use, recorded in this known-vats file.
    KnownVats(PathBuf),
    /// Server mode: clients in the allow-list file and/or the given VatIds.
    AllowedClients {
        /// The allow-list file, reloaded when it changes.
        file: Option<PathBuf>,
        /// VatIds allowed whatever the file says.
        vat_ids: Vec<VatId>,
    },
}

/// A service's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Connections open at once (handshaking or forwarding). When reached,
    /// new connections wait in the listen backlog.
    pub max_connections: usize,
    /// Handshakes past message 1 at once: the most Diffie-Hellman work
    /// unauthenticated peers (or a flood of them) can cause at a time (see
    /// [`capnp_noise::admission`]). A connection waits for a slot within its
    /// `handshake_timeout`.
    pub max_handshakes: usize,
    /// Of those, at most this many from one source address (IPv4 address,
    /// IPv6 /64); more wait, unanswered, for one of theirs to end.
    pub max_handshakes_per_source: usize,
    /// Server: at most this many connections not yet authenticated from one
    /// source address (IPv4 address, IPv6 /64); more are closed as soon as
    /// they are accepted, so silent sockets from one address cannot hold
    /// every connection place (see
    /// [`capnp_noise::admission::UnauthenticatedLimit`]). Each must also
    /// deliver message 1 within
    /// [`capnp_noise::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT`] (3 s).
    pub max_unauthenticated_per_source: usize,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// How long a TCP connect (to the server, or to the target) may take.
    pub connect_timeout: Duration,
    /// The keepalive interval: an empty DATA frame is sent in each interval
    /// in which nothing else was sent over capnp-noise. `None`: none.
    pub keepalive: Option<Duration>,
    /// How long a connection may go without data either way before it is
    /// closed. `None`: no limit.
    pub idle_timeout: Option<Duration>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive: None,
            idle_timeout: None,
        }
    }
}

// ----- reading the file format -----

/// A TOML value with its place in the file.
type Item<'i> = Spanned<DeValue<'i>>;

/// Reads one file: records where each key was written, and makes errors
/// that name the file and the position.
struct Reader<'a> {
    text: &'a str,
    file: &'a Path,
    positions: Positions,
}

impl Reader<'_> {
    fn error(&self, span: Option<Range<usize>>, key: Option<String>, what: Problem) -> ConfigError {
        ConfigError {
            file: Some(self.file.to_path_buf()),
            position: span.and_then(|s| Position::of(self.text, s.start)),
            key,
            what,
        }
    }

    fn record(&mut self, path: String, span: Range<usize>) {
        if let Some(p) = Position::of(self.text, span.start) {
            self.positions.0.insert(path, p);
        }
    }

    /// Converts `value` (of key path `path`) with `read`, or fails naming it.
    fn value<'v, 'i, T>(
        &self,
        path: &str,
        value: &'v Item<'i>,
        read: impl FnOnce(&'v DeValue<'i>) -> Result<T, Problem>,
    ) -> Result<T, ConfigError> {
        read(value.get_ref())
            .map_err(|what| self.error(Some(value.span()), Some(path.into()), what))
    }

    /// A string, or a list of strings (each recorded as `at[i]`).
    fn strings(
        &mut self,
        path: &str,
        at: &str,
        value: &Item<'_>,
    ) -> Result<Vec<String>, ConfigError> {
        if let DeValue::String(s) = value.get_ref() {
            return Ok(vec![s.to_string()]);
        }
        let list = self.value(path, value, |v| {
            v.as_array()
                .ok_or(Problem::Expected("a VatId or a list of VatIds"))
        })?;
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            self.record(format!("{at}[{i}]"), item.span());
            out.push(self.value(path, item, string)?);
        }
        Ok(out)
    }

    /// The error for unknown key `key` of the table at `table` (`None`: the
    /// top level): it names the key only when it is short and plain.
    fn unknown(
        &self,
        table: Option<&str>,
        key: &Spanned<std::borrow::Cow<'_, str>>,
    ) -> ConfigError {
        let name = key.get_ref();
        let plain = !name.is_empty()
            && name.len() <= MAX_SHOWN_UNKNOWN_KEY
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        let shown = match (table, plain) {
            (Some(t), true) => Some(format!("{t}.{name}")),
            (None, true) => Some(name.to_string()),
            (t, false) => t.map(str::to_string),
        };
        self.error(Some(key.span()), shown, Problem::UnknownKey)
    }
}

/// A table's entries in the order they were written (so that the first
/// problem in the file is the one reported).
fn in_file_order<'t, 'i>(
    table: &'t DeTable<'i>,
) -> Vec<(&'t Spanned<std::borrow::Cow<'i, str>>, &'t Item<'i>)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries
}

fn string(v: &DeValue<'_>) -> Result<String, Problem> {
    v.as_str()
        .map(str::to_string)
        .ok_or(Problem::Expected("a string"))
}

fn boolean(v: &DeValue<'_>) -> Result<bool, Problem> {
    match v {
        DeValue::Boolean(b) => Ok(*b),
        _ => Err(Problem::Expected("true or false")),
    }
}

fn file_name(v: &DeValue<'_>) -> Result<PathBuf, Problem> {
    v.as_str()
        .map(PathBuf::from)
        .ok_or(Problem::Expected("a file name (a string)"))
}

fn whole_number(v: &DeValue<'_>) -> Result<usize, Problem> {
    let n = v.as_integer().ok_or(Problem::Expected(COUNT_RANGE))?;
    u64::from_str_radix(n.as_str(), n.radix())
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(Problem::OutOfRange(COUNT_RANGE))
}

fn number(v: &DeValue<'_>) -> Result<f64, Problem> {
    match v {
        DeValue::Integer(n) => i64::from_str_radix(n.as_str(), n.radix())
            .map(|n| n as f64)
            .map_err(|_| Problem::OutOfRange(SECONDS_RANGE)),
        DeValue::Float(x) => x
            .as_str()
            .parse()
            .map_err(|_| Problem::OutOfRange(SECONDS_RANGE)),
        _ => Err(Problem::Expected("a number of seconds")),
    }
}

/// The range of [`TunnelConfig::workers`], as errors state it.
const WORKERS_RANGE: &str = "a whole number from 0 to 1024";

/// The range of file modes, as errors state it.
const MODE_RANGE: &str = "a file mode from 0 to 0o777 (in TOML, write 0o660 or \"660\")";

/// A file mode: a TOML integer (`0o660`) or a string of octal digits.
fn file_mode(v: &DeValue<'_>) -> Result<u32, Problem> {
    let mode = match v {
        DeValue::Integer(n) => u32::from_str_radix(n.as_str(), n.radix()).ok(),
        DeValue::String(s) => octal_mode(s).ok(),
        _ => return Err(Problem::Expected(MODE_RANGE)),
    };
    mode.filter(|m| *m <= 0o777)
        .ok_or(Problem::OutOfRange(MODE_RANGE))
}

/// An octal file mode on the command line (`660`, `0660`, `0o660`).
fn octal_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.starts_with('+') => Ok(m),
        _ => Err("expected an octal file mode up to 777, e.g. 660".into()),
    }
}

/// A string naming one of `T`'s values, as the command line names them
/// (one model); `expected` lists them for the error.
fn choice<T: clap::ValueEnum>(v: &DeValue<'_>, expected: &'static str) -> Result<T, Problem> {
    v.as_str()
        .and_then(|s| T::from_str(s, false).ok())
        .ok_or(Problem::Expected(expected))
}

impl LimitsSpec {
    /// Reads `key` if it is a limit: `None` if it is not one.
    fn read(&mut self, key: &str, v: &DeValue<'_>) -> Option<Result<(), Problem>> {
        Some(match key {
            "max_connections" => whole_number(v).map(|n| self.max_connections = Some(n)),
            "max_handshakes" => whole_number(v).map(|n| self.max_handshakes = Some(n)),
            "max_handshakes_per_source" => {
                whole_number(v).map(|n| self.max_handshakes_per_source = Some(n))
            }
            "max_unauthenticated_per_source" => {
                whole_number(v).map(|n| self.max_unauthenticated_per_source = Some(n))
            }
            "handshake_timeout" => number(v).map(|s| self.handshake_timeout = Some(s)),
            "connect_timeout" => number(v).map(|s| self.connect_timeout = Some(s)),
            "keepalive" => number(v).map(|s| self.keepalive = Some(s)),
            "idle_timeout" => number(v).map(|s| self.idle_timeout = Some(s)),
            _ => return None,
        })
    }
}

impl ServiceSpec {
    /// Reads the table of service `name` (written at `at`).
    fn read(
        file: &mut Reader<'_>,
        name: &str,
        at: Range<usize>,
        table: &DeTable<'_>,
    ) -> Result<Self, ConfigError> {
        let table_path = format!("service.{name}");
        // Until the name is checked (by `check`), errors name the table only.
        let shown = valid_service_name(name).then_some(table_path.as_str());
        let key_path =
            |k: &str| shown.map_or_else(|| "service".to_string(), |t| format!("{t}.{k}"));
        file.record(table_path.clone(), at.clone());
        let (mut mode_, mut listen, mut connect) = (None, None, None);
        let mut spec = ServiceSpec::new(Mode::Client, "", "");
        for (key, value) in in_file_order(table) {
            let k = key.get_ref().as_ref();
            let p = key_path(k);
            file.record(format!("{table_path}.{k}"), value.span());
            match k {
                "mode" => {
                    mode_ = Some(file.value(&p, value, |v| choice(v, "\"client\" or \"server\""))?);
                }
                "listen" => listen = Some(file.value(&p, value, string)?),
                "connect" => connect = Some(file.value(&p, value, string)?),
                "listen_mode" => spec.listen_mode = Some(file.value(&p, value, file_mode)?),
                "peer" => spec.peer = file.strings(&p, &format!("{table_path}.{k}"), value)?,
                "known_vats" => spec.known_vats = Some(file.value(&p, value, file_name)?),
                "allow" => spec.allow = Some(file.value(&p, value, file_name)?),
                "proxy_protocol" => {
                    spec.proxy_protocol =
                        Some(file.value(&p, value, |v| choice(v, "\"v1\" or \"v2\""))?);
                }
                "via" => spec.via = Some(file.value(&p, value, string)?),
                "suite" => {
                    let expected = "\"auto\", \"chachapoly\" or \"aesgcm\"";
                    spec.suite = Some(file.value(&p, value, |v| choice(v, expected))?);
                }
                "allow_vat" => {
                    spec.allow_vat = file.strings(&p, &format!("{table_path}.{k}"), value)?;
                }
                "resumption" => spec.resumption = file.value(&p, value, boolean)?,
                "early_data" => spec.early_data = file.value(&p, value, boolean)?,
                _ => match spec.limits.read(k, value.get_ref()) {
                    Some(read) => {
                        read.map_err(|what| file.error(Some(value.span()), Some(p), what))?
                    }
                    None => return Err(file.unknown(shown.or(Some("service")), key)),
                },
            }
        }
        let missing =
            |k: &str, what| file.error(Some(at.clone()), Some(key_path(k)), Problem::Missing(what));
        spec.mode = mode_.ok_or_else(|| missing("mode", "mode = \"client\" or \"server\""))?;
        spec.listen =
            listen.ok_or_else(|| missing("listen", "the address to listen on, HOST:PORT"))?;
        spec.connect =
            connect.ok_or_else(|| missing("connect", "the address to connect to, HOST:PORT"))?;
        Ok(spec)
    }
}

impl TunnelSpec {
    /// Parses the TOML text of a configuration file; `path` names it in
    /// errors.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the line and column, the key and
    /// the problem: invalid TOML, an unknown key, a value of the wrong type,
    /// a service without `mode`, `listen` or `connect`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut file = Reader {
            text,
            file: path,
            positions: Positions::default(),
        };
        let doc = DeTable::parse(text).map_err(|e| file.error(e.span(), None, Problem::Syntax))?;
        let mut spec = TunnelSpec::default();
        for (key, value) in in_file_order(doc.get_ref()) {
            let k = key.get_ref().as_ref();
            file.record(k.to_string(), value.span());
            match k {
                "identity" => spec.identity = Some(file.value(k, value, file_name)?),
                "shutdown_grace" => spec.shutdown_grace = Some(file.value(k, value, number)?),
                "metrics" => spec.metrics = Some(file.value(k, value, string)?),
                "workers" => {
                    let workers = |v: &DeValue<'_>| {
                        whole_number(v).map_err(|_| Problem::OutOfRange(WORKERS_RANGE))
                    };
                    spec.workers = Some(file.value(k, value, workers)?);
                }
                "log_format" => {
                    let expected = "\"text\" or \"json\"";
                    spec.log_format = Some(file.value(k, value, |v| choice(v, expected))?);
                }
                "service" => {
                    let services = file.value(k, value, |v| {
                        v.as_table()
                            .ok_or(Problem::Expected("[service.NAME] tables"))
                    })?;
                    for (name, table) in in_file_order(services) {
                        let n = name.get_ref().as_ref();
                        let table = table.get_ref().as_table().ok_or_else(|| {
                            file.error(
                                Some(table.span()),
                                Some("service".into()),
                                Problem::Expected("a [service.NAME] table"),
                            )
                        })?;
                        let service = ServiceSpec::read(&mut file, n, name.span(), table)?;
                        spec.services.insert(n.to_string(), service);
                    }
                }
                _ => match spec.limits.read(k, value.get_ref()) {
                    Some(read) => {
                        read.map_err(|what| file.error(Some(value.span()), Some(k.into()), what))?
                    }
                    None => return Err(file.unknown(None, key)),
                },
            }
        }
        spec.written_at = file.positions;
        Ok(spec)
    }

    /// Reads and parses a configuration file.
    ///
    /// # Errors
    /// A [`ConfigError`] if it cannot be read, is larger than
    /// [`MAX_CONFIG_FILE_LEN`] or is not UTF-8; see
    /// [`from_toml`](Self::from_toml).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let whole = |what| ConfigError {
            file: Some(path.to_path_buf()),
            position: None,
            key: None,
            what,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_FILE_LEN + 1).read_to_end(&mut bytes))
            .map_err(|e| whole(Problem::Unreadable(e.kind())))?;
        if bytes.len() as u64 > MAX_CONFIG_FILE_LEN {
            return Err(whole(Problem::TooLarge));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| whole(Problem::NotUtf8))?;
        Self::from_toml(text, path)
    }

    /// Checks every setting and fills in the defaults.
    ///
    /// # Errors
    /// A [`ConfigError`] for the first problem, naming the setting as
    /// `origin` wrote it (with its line and column for a file): a missing
    /// identity or service, an invalid service name or address, a malformed
    /// VatId, settings of the wrong mode or missing trust settings, a limit
    /// out of range.
    pub fn check(&self, origin: Origin<'_>) -> Result<TunnelConfig, ConfigError> {
        self.check_on(origin, Platform::HERE)
    }

    /// [`check`](Self::check) as it goes on `platform`: the refusals of
    /// another system's missing features are tested on any.
    pub(crate) fn check_on(
        &self,
        origin: Origin<'_>,
        platform: Platform,
    ) -> Result<TunnelConfig, ConfigError> {
        let at = Checker {
            origin,
            positions: &self.written_at,
            platform,
        };
        let identity =
            self.identity.as_deref().ok_or_else(|| {
                at.error(None, "identity", Problem::Missing(
                "the key file of this tunnel's identity (create one with `capnp-noise keygen`)",
            ))
            })?;
        if self.services.is_empty() {
            return Err(at.error_item(None, None, None, Problem::NoService));
        }
        let defaults = self.limits.check(&at, None, LimitsConfig::default())?;
        let services = self
            .services
            .iter()
            .map(|(name, spec)| spec.check(name, &at, defaults))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TunnelConfig {
            identity: origin.resolve(identity),
            shutdown_grace: seconds(self.shutdown_grace, DEFAULT_SHUTDOWN_GRACE)
                .map_err(|what| at.error(None, "shutdown_grace", what))?,
            log_format: self.log_format.unwrap_or_default(),
            workers: match self.workers {
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) if n <= MAX_WORKERS => n,
                Some(_) => {
                    return Err(at.error(None, "workers", Problem::OutOfRange(WORKERS_RANGE)))
                }
            },
            metrics: match &self.metrics {
                Some(addr) => {
                    check_address(addr, true)
                        .map_err(|why| at.error(None, "metrics", Problem::Address(why)))?;
                    Some(addr.clone())
                }
                None => None,
            },
            services,
        })
    }
}

/// Makes the errors of [`TunnelSpec::check`].
struct Checker<'a> {
    origin: Origin<'a>,
    positions: &'a Positions,
    platform: Platform,
}

/// What the system the tunnel runs on offers beyond TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Platform {
    /// Unix domain sockets (`unix:/PATH`) and their file modes.
    pub(crate) unix_sockets: bool,
    /// systemd's socket activation (`systemd:NAME`).
    pub(crate) socket_activation: bool,
}

impl Platform {
    /// This system: Unix has both (socket activation needs systemd, which
    /// is checked when the socket is taken); Windows has neither.
    pub(crate) const HERE: Platform = Platform {
        unix_sockets: cfg!(unix),
        socket_activation: cfg!(unix),
    };
    /// Windows (and any other system without Unix sockets).
    #[cfg(test)]
    pub(crate) const WINDOWS: Platform = Platform {
        unix_sockets: false,
        socket_activation: false,
    };
}

impl Checker<'_> {
    /// Whether `key` of service `service` was written as a list.
    fn written_as_list(&self, service: &str, key: &str) -> bool {
        self.positions
            .0
            .contains_key(&format!("service.{service}.{key}[0]"))
    }

    /// The error for `key` of service `service` (or of the top level).
    fn error(&self, service: Option<&str>, key: &str, what: Problem) -> ConfigError {
        self.error_item(service, Some(key), None, what)
    }

    /// As [`error`](Self::error); `key` `None` names the service itself
    /// (or nothing), `item` an element of a list.
    fn error_item(
        &self,
        service: Option<&str>,
        key: Option<&str>,
        item: Option<usize>,
        what: Problem,
    ) -> ConfigError {
        match self.origin {
            Origin::CommandLine => ConfigError {
                file: None,
                position: None,
                key: key
                    .or(service.map(|_| "name"))
                    .map(|k| format!("--{}", k.replace('_', "-"))),
                what,
            },
            Origin::File(file) => {
                let path = match (service, key) {
                    (Some(s), Some(k)) => format!("service.{s}.{k}"),
                    (Some(s), None) => format!("service.{s}"),
                    (None, Some(k)) => k.to_string(),
                    (None, None) => String::new(),
                };
                let written = match item {
                    Some(i) => format!("{path}[{i}]"),
                    None => path.clone(),
                };
                let position = self.positions.0.get(&written).copied();
                let shown = match service {
                    Some(s) if !valid_service_name(s) => Some("service".to_string()),
                    _ => (!path.is_empty()).then_some(path),
                };
                ConfigError {
                    file: Some(file.to_path_buf()),
                    position,
                    key: shown,
                    what,
                }
            }
        }
    }
}

impl LimitsSpec {
    fn check(
        &self,
        at: &Checker<'_>,
        service: Option<&str>,
        base: LimitsConfig,
    ) -> Result<LimitsConfig, ConfigError> {
        let count = |v, d, k| count(v, d).map_err(|what| at.error(service, k, what));
        let seconds = |v, d, k| seconds(v, d).map_err(|what| at.error(service, k, what));
        let optional = |v, d, k| optional_seconds(v, d).map_err(|what| at.error(service, k, what));
        Ok(LimitsConfig {
            max_connections: count(
                self.max_connections,
                base.max_connections,
                "max_connections",
            )?,
            max_handshakes: count(self.max_handshakes, base.max_handshakes, "max_handshakes")?,
            max_handshakes_per_source: count(
                self.max_handshakes_per_source,
                base.max_handshakes_per_source,
                "max_handshakes_per_source",
            )?,
            max_unauthenticated_per_source: count(
                self.max_unauthenticated_per_source,
                base.max_unauthenticated_per_source,
                "max_unauthenticated_per_source",
            )?,
            handshake_timeout: seconds(
                self.handshake_timeout,
                base.handshake_timeout,
                "handshake_timeout",
            )?,
            connect_timeout: seconds(
                self.connect_timeout,
                base.connect_timeout,
                "connect_timeout",
            )?,
            keepalive: optional(self.keepalive, base.keepalive, "keepalive")?,
            idle_timeout: optional(self.idle_timeout, base.idle_timeout, "idle_timeout")?,
        })
    }
}

/// Whether `name` is a service name of the documented form.
fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ServiceSpec {
    fn check(
        &self,
        name: &str,
        at: &Checker<'_>,
        defaults: LimitsConfig,
    ) -> Result<ServiceConfig, ConfigError> {
        if !valid_service_name(name) {
            return Err(at.error_item(Some(name), None, None, Problem::ServiceName));
        }
        let bad = |k: &str, what| at.error(Some(name), k, what);
        let (plain_listen, plain_connect) = (self.mode == Mode::Client, self.mode == Mode::Server);
        check_endpoint(&self.listen, true, plain_listen, at.platform)
            .map_err(|why| bad("listen", Problem::Address(why)))?;
        check_endpoint(&self.connect, false, plain_connect, at.platform)
            .map_err(|why| bad("connect", Problem::Address(why)))?;
        if self.listen_mode.is_some() && !self.listen.starts_with("unix:") {
            return Err(bad("listen_mode", Problem::NotUnix));
        }
        let listen_mode = self.listen_mode.unwrap_or(DEFAULT_LISTEN_MODE);
        if listen_mode > 0o777 {
            return Err(bad("listen_mode", Problem::OutOfRange(MODE_RANGE)));
        }
        let wrong_mode = |k: &str| bad(k, Problem::WrongMode(self.mode));
        // Each VatId of a list, an error naming the one that is not.
        let vat_ids = |texts: &[String], key: &str| {
            texts
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.trim().parse::<VatId>().map_err(|_| {
                        let item = (texts.len() > 1 || at.written_as_list(name, key)).then_some(i);
                        at.error_item(Some(name), Some(key), item, Problem::NotAVatId)
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if self.early_data && !self.resumption {
            return Err(bad("early_data", Problem::EarlyDataWithoutResumption));
        }
        if self.resumption && self.mode == Mode::Client && self.known_vats.is_some() {
            return Err(bad("resumption", Problem::ResumptionWithoutPeer));
        }
        let trust = match self.mode {
            Mode::Client => {
                if self.allow.is_some() {
                    return Err(wrong_mode("allow"));
                }
                if !self.allow_vat.is_empty() {
                    return Err(wrong_mode("allow_vat"));
                }
                if self.proxy_protocol.is_some() {
                    return Err(wrong_mode("proxy_protocol"));
                }
                match (self.peer.is_empty(), &self.known_vats) {
                    (false, None) => Trust::PinnedServer(vat_ids(&self.peer, "peer")?),
                    (true, Some(file)) => Trust::KnownVats(at.origin.resolve(file)),
                    (false, Some(_)) => return Err(bad("known_vats", Problem::PeerAndKnownVats)),
                    (true, None) => return Err(bad("peer", Problem::NoTrust(Mode::Client))),
                }
            }
            Mode::Server => {
                if !self.peer.is_empty() {
                    return Err(wrong_mode("peer"));
                }
                if self.via.is_some() {
                    return Err(wrong_mode("via"));
                }
                if self.known_vats.is_some() {
                    return Err(wrong_mode("known_vats"));
                }
                if self.allow.is_none() && self.allow_vat.is_empty() {
                    return Err(bad("allow", Problem::NoTrust(Mode::Server)));
                }
                Trust::AllowedClients {
                    file: self.allow.as_deref().map(|f| at.origin.resolve(f)),
                    vat_ids: vat_ids(&self.allow_vat, "allow_vat")?,
                }
            }
        };
        Ok(ServiceConfig {
            name: name.to_string(),
            listen: self.listen.clone(),
            connect: self.connect.clone(),
            listen_mode,
            trust,
            proxy_protocol: self.proxy_protocol,
            via: match &self.via {
                None => None,
                Some(text) => {
                    let via = Via::parse(text).map_err(|why| bad("via", Problem::Address(why)))?;
                    check_address(via.proxy(), false)
                        .map_err(|why| bad("via", Problem::Address(why)))?;
                    Some(via)
                }
            },
            suite: self.suite.and_then(SuiteChoice::suite),
            resumption: self.resumption,
            early_data: self.early_data,
            key_log: None,
            limits: self.limits.check(at, Some(name), defaults)?,
        })
    }
}

impl TunnelConfig {
    /// Reads, parses and checks a configuration file.
    ///
    /// # Errors
    /// See [`TunnelSpec::load`] and [`TunnelSpec::check`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        TunnelSpec::load(path)?.check(Origin::File(path))
    }
}

/// The longest path of a Unix socket (`sun_path` holds 108 bytes with the
/// final NUL).
const MAX_UNIX_PATH: usize = 107;

/// Checks `HOST:PORT`, or `unix:/PATH` where the address is a plain one
/// (`plain`: a client's listen, a server's connect).
fn check_endpoint(
    addr: &str,
    port_zero_ok: bool,
    plain: bool,
    platform: Platform,
) -> Result<(), &'static str> {
    if let Some(name) = addr.strip_prefix("systemd:") {
        if !port_zero_ok {
            return Err("systemd: names a listening socket: use it in listen");
        }
        if !platform.socket_activation {
            return Err("systemd: socket activation is not available on this system (Windows): listen on HOST:PORT");
        }
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
        return if ok {
            Ok(())
        } else {
            Err("write systemd: and the socket's FileDescriptorName (1 to 255 characters, no ':')")
        };
    }
    let Some(path) = addr.strip_prefix("unix:") else {
        return check_address(addr, port_zero_ok);
    };
    if !plain {
        return Err("a unix: socket can only be a client's listen or a server's connect address (capnp-noise runs over TCP)");
    }
    if !platform.unix_sockets {
        return Err("unix: sockets are not available on this system (Windows): use HOST:PORT, e.g. 127.0.0.1:PORT");
    }
    if !path.starts_with('/') {
        return Err("write unix: and an absolute path");
    }
    if path.len() > MAX_UNIX_PATH || path.contains('\0') {
        return Err("a Unix socket's path is at most 107 bytes, without NUL");
    }
    Ok(())
}

/// Checks the form `HOST:PORT` (IPv6 in brackets); resolving the host is
/// left to binding or connecting.
fn check_address(addr: &str, port_zero_ok: bool) -> Result<(), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("write HOST:PORT")?;
    if host.is_empty() {
        return Err("no host (write e.g. 127.0.0.1:PORT)");
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
        if !ok {
            return Err("the host is not a bracketed IPv6 address");
        }
    } else if host.contains(':') {
        return Err("write an IPv6 address in brackets, e.g. [::1]:PORT");
    } else if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the host contains spaces");
    }
    match port.parse::<u16>() {
        Ok(0) if !port_zero_ok => Err("port 0 cannot be connected to"),
        Ok(_) => Ok(()),
        Err(_) => Err("not a port number (0-65535)"),
    }
}

fn count(value: Option<usize>, default: usize) -> Result<usize, Problem> {
    match value {
        None => Ok(default),
        Some(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        Some(_) => Err(Problem::OutOfRange(COUNT_RANGE)),
    }
}

/// A duration where 0 means "none": `Ok(None)`.
fn optional_seconds(
    value: Option<f64>,
    default: Option<Duration>,
) -> Result<Option<Duration>, Problem> {
    match value {
        None => Ok(default),
        Some(0.0) => Ok(None),
        Some(s) => seconds(Some(s), Duration::ZERO)
            .map(Some)
            .map_err(|_| Problem::OutOfRange(OPTIONAL_SECONDS_RANGE)),
    }
}

fn seconds(value: Option<f64>, default: Duration) -> Result<Duration, Problem> {
    match value {
        None => Ok(default),
        // `1e-10` is above 0 but no whole nanosecond: it must not become a
        // zero timeout.
        Some(s) if s > 0.0 && s <= MAX_SECONDS && !Duration::from_secs_f64(s).is_zero() => {
            Ok(Duration::from_secs_f64(s))
        }
        Some(_) => Err(Problem::OutOfRange(SECONDS_RANGE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_noise::Identity;

    fn file() -> &'static Path {
        Path::new("/etc/tunnel.toml")
    }

    fn check_text(text: &str) -> Result<TunnelConfig, ConfigError> {
        TunnelSpec::from_toml(text, file())?.check(Origin::File(file()))
    }

    fn err(text: &str) -> ConfigError {
        check_text(text).unwrap_err()
    }

    /// The error's key, position and problem.
    fn parts(e: &ConfigError) -> (Option<&str>, Option<(usize, usize)>, Problem) {
        (
            e.key.as_deref(),
            e.position.map(|p| (p.line, p.column)),
            e.what,
        )
    }

    #[test]
    fn a_file_with_two_services() {
        let server_vat = Identity::from_seed(&[1; 32]).vat_id();
        let friend = Identity::from_seed(&[2; 32]).vat_id();
        let config = check_text(&format!(
            r#"
            identity = "keys/tunnel.key"
            shutdown_grace = 2.5
            max_connections = 10

            [service.web]
            mode = "server"
            listen = "[::]:8443"
            connect = "127.0.0.1:8080"
            allow = "web.allow"
            allow_vat = ["{friend}"]
            max_connections = 3
            handshake_timeout = 1

            [service.db]
            mode = "client"
            listen = "127.0.0.1:0"
            connect = "db.example.com:5433"
            peer = "{server_vat}"
            "#
        ))
        .unwrap();
        assert_eq!(config.identity, Path::new("/etc/keys/tunnel.key"));
        assert_eq!(config.shutdown_grace, Duration::from_millis(2500));
        let [db, web] = &config.services[..] else {
            panic!("expected two services, got {:?}", config.services);
        };
        assert_eq!((db.name.as_str(), db.mode()), ("db", Mode::Client));
        assert!(matches!(&db.trust, Trust::PinnedServer(v) if v == &[server_vat]));
        assert_eq!(db.limits.max_connections, 10, "file default applies");
        assert_eq!(db.limits.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(web.mode(), Mode::Server);
        assert_eq!(web.listen, "[::]:8443");
        assert_eq!(web.limits.max_connections, 3, "service overrides");
        assert_eq!(web.limits.handshake_timeout, Duration::from_secs(1));
        assert_eq!(web.limits.max_handshakes, DEFAULT_MAX_HANDSHAKES);
        match &web.trust {
            Trust::AllowedClients { file, vat_ids } => {
                assert_eq!(file.as_deref(), Some(Path::new("/etc/web.allow")));
                assert_eq!(vat_ids, &[friend]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_example_in_the_module_docs_is_valid() {
        let docs: String = include_str!("lib.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect();
        let start = docs.find("```toml\n").expect("a TOML example") + 8;
        let len = docs[start..].find("```").unwrap();
        let vat = Identity::from_seed(&[5; 32]).vat_id().to_string();
        let example = docs[start..start + len].replace("vat1...", &vat);
        let config = check_text(&example).unwrap();
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["calendar", "postgres"]);
        assert_eq!(config.services[0].limits.max_connections, 50);
    }

    const HEAD: &str =
        "identity = \"k\"\n[service.s]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\n";

    #[test]
    fn workers_default_to_one_per_core_and_0_is_allowed() {
        let with =
            |line: &str| check_text(&format!("{line}\n{HEAD}mode = \"server\"\nallow = \"a\"\n"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(with("").unwrap().workers, cores);
        assert_eq!(with("workers = 3").unwrap().workers, 3);
        assert_eq!(with("workers = 0").unwrap().workers, 0);
        for bad in ["workers = 1025", "workers = -1", "workers = \"2\""] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("workers"), "{bad}: {e}");
            assert!(e.to_string().contains("from 0 to 1024"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_file_the_position_and_the_key() {
        let e = err(&format!("{HEAD}mode = \"client\"\npeeer = \"x\"\n"));
        assert_eq!(
            parts(&e),
            (Some("service.s.peeer"), Some((6, 1)), Problem::UnknownKey)
        );
        assert!(
            e.to_string()
                .starts_with("/etc/tunnel.toml: line 6, column 1: service.s.peeer: unknown key"),
            "{e}"
        );
        let e = err("identiti = \"k\"\n");
        assert_eq!(
            parts(&e),
            (Some("identiti"), Some((1, 1)), Problem::UnknownKey)
        );
        // A value's problem points at the value.
        let e = err(&format!("{HEAD}mode = \"proxy\"\n"));
        assert_eq!(
            parts(&e),
            (
                Some("service.s.mode"),
                Some((5, 8)),
                Problem::Expected("\"client\" or \"server\"")
            )
        );
        let e = err(&format!("{HEAD}  mode = \"client\"\n  peer = 7\n"));
        assert_eq!(
            parts(&e),
            (
                Some("service.s.peer"),
                Some((6, 10)),
                Problem::Expected("a VatId or a list of VatIds")
            )
        );
        // A missing key points at its table.
        let e = err("identity = \"k\"\n[service.s]\nmode = \"client\"\nlisten = \"h:1\"\n");
        assert_eq!(
            parts(&e),
            (
                Some("service.s.connect"),
                Some((2, 10)),
                Problem::Missing("the address to connect to, HOST:PORT")
            )
        );
        // Columns count characters, not bytes.
        let e = err("# é\nidentity = \"k\"\n max_connections = \"é\"\n");
        assert_eq!(
            parts(&e),
            (
                Some("max_connections"),
                Some((3, 20)),
                Problem::Expected(COUNT_RANGE)
            )
        );
    }

    #[test]
    fn errors_of_the_check_point_at_the_value() {
        let e = err(&format!("{HEAD}mode = \"client\"\npeer = \"vat1nope\"\n"));
        assert_eq!(
            parts(&e),
            (Some("service.s.peer"), Some((6, 8)), Problem::NotAVatId)
        );
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let list = format!("allow_vat = [\"{vat}\", \"abc\"]");
        let e = err(&format!("{HEAD}mode = \"server\"\n{list}\n"));
        assert_eq!(
            parts(&e),
            (
                Some("service.s.allow_vat"),
                Some((6, list.find("\"abc\"").unwrap() + 1)),
                Problem::NotAVatId
            )
        );
        let e = err(&format!(
            "max_handshakes = 0\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert_eq!(
            parts(&e),
            (
                Some("max_handshakes"),
                Some((1, 18)),
                Problem::OutOfRange(COUNT_RANGE)
            )
        );
        assert!(
            e.to_string()
                .starts_with("/etc/tunnel.toml: line 1, column 18: max_handshakes: out of range"),
            "{e}"
        );
    }

    #[test]
    fn the_command_line_names_options() {
        let mut spec = TunnelSpec {
            identity: Some("k".into()),
            ..TunnelSpec::default()
        };
        let mut svc = ServiceSpec::new(Mode::Client, "127.0.0.1:0", "h:1");
        svc.peer = vec!["vat1nope".into()];
        svc.limits.connect_timeout = Some(0.5);
        spec.services.insert("client".into(), svc.clone());
        let e = spec.check(Origin::CommandLine).unwrap_err();
        assert_eq!(e.to_string(), format!("--peer: {}", Problem::NotAVatId));
        svc.peer = Vec::new();
        svc.allow_vat = vec!["x".into()];
        spec.services.insert("client".into(), svc);
        let e = spec.check(Origin::CommandLine).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--allow-vat: only applies to a server service, and this one is a client"
        );
        spec.services.clear();
        let e = spec.check(Origin::CommandLine).unwrap_err();
        assert_eq!((e.file, e.key, e.what), (None, None, Problem::NoService));
    }

    /// No value written comes back in an error, whatever it holds: a key
    /// pasted into a string, long values, invalid TOML around a secret.
    #[test]
    fn errors_never_quote_a_value() {
        let pem = Identity::from_seed(&[4; 32]).to_pkcs8_pem().to_string();
        let body = &pem.lines().nth(1).unwrap()[..16];
        let long = "*".repeat(10_000);
        let secret = "MC4CAQAwBQYDK2VwBCIEI";
        for text in [
            format!("{HEAD}mode = \"client\"\npeer = \"\"\"{pem}\"\"\"\n"),
            format!("{HEAD}mode = \"server\"\nallow_vat = [\"{body}\"]\n"),
            format!("{HEAD}mode = \"\"\"x{pem}\"\"\"\n"),
            format!("{HEAD}mode = \"server\"\nallow = \"a\"\nmax_connections = \"{pem}\"\n"),
            format!(
                "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"\"\"{pem}\"\"\"\n"
            ),
            format!(
                "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2{long}\"\n"
            ),
            // Invalid TOML: toml's own message quotes the line.
            format!("{HEAD}mode = \"client\"\npeer = \"{secret}\u{1}{long}\"\n"),
            format!("{HEAD}mode = \"client\"\n{secret} {long}\n"),
            // Keys that are not plain names are not shown.
            format!("{HEAD}mode = \"client\"\n\"{pem}\" = 1\n"),
            format!("{HEAD}mode = \"client\"\nMC4CAQAwBQYDK2VwBCIEI = 1\n"),
            format!("{HEAD}mode = \"client\"\n{} = 1\n", "k".repeat(10_000)),
            format!("identity = \"k\"\n[service.\"{pem}\"]\nmode = \"x\"\n"),
            format!(
                "identity = \"k\"\n[service.{}]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h\"\nconnect = \"h:2\"\n",
                "n".repeat(100)
            ),
        ] {
            let e = err(&text).to_string();
            assert!(e.len() < 300, "{e:.400}");
            for leak in [body, secret, "BEGIN", "*****", "kkkkk", "nnnnn"] {
                assert!(!e.contains(leak), "{leak:?} in {e:.400}");
            }
        }
    }

    #[test]
    fn a_service_name_of_the_wrong_form_is_not_shown() {
        let e = err(
            "identity = \"k\"\n[service.\"a b\"]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n",
        );
        assert_eq!(
            parts(&e),
            (Some("service"), Some((2, 10)), Problem::ServiceName)
        );
        let name = "n".repeat(MAX_SERVICE_NAME);
        let ok = format!(
            "identity = \"k\"\n[service.{name}]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n"
        );
        assert_eq!(check_text(&ok).unwrap().services[0].name, name);
        let e = err(&ok.replace(&name, &format!("{name}n")));
        assert_eq!(e.what, Problem::ServiceName);
    }

    #[test]
    fn a_timeout_below_a_nanosecond_is_refused() {
        // Found by replaying a hand-written input through the tunnel_config
        // fuzz target (libFuzzer did not reach it): 1e-10 passed "above 0"
        // and became a zero Duration.
        for key in ["handshake_timeout", "connect_timeout", "shutdown_grace"] {
            let e = err(&format!(
                "{key} = 1e-10\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
            ));
            assert_eq!(
                (e.key.as_deref(), e.what),
                (Some(key), Problem::OutOfRange(SECONDS_RANGE))
            );
        }
        let c = check_text(&format!(
            "handshake_timeout = 1e-9\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ))
        .unwrap();
        assert_eq!(c.services[0].limits.keepalive, None, "off by default");
        assert_eq!(
            c.services[0].limits.handshake_timeout,
            Duration::from_nanos(1)
        );
    }

    #[test]
    fn keepalive_and_idle_timeout_are_off_by_default_and_0_turns_them_off() {
        let c = check_text(&format!(
            "keepalive = 15\nidle_timeout = 600\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ))
        .unwrap();
        let l = c.services[0].limits;
        assert_eq!(l.keepalive, Some(Duration::from_secs(15)));
        assert_eq!(l.idle_timeout, Some(Duration::from_secs(600)));
        let c = check_text(&format!(
            "keepalive = 15\n{HEAD}mode = \"server\"\nallow = \"a\"\nkeepalive = 0\nidle_timeout = 0.5\n"
        ))
        .unwrap();
        let l = c.services[0].limits;
        assert_eq!(l.keepalive, None, "a service turns the default off");
        assert_eq!(l.idle_timeout, Some(Duration::from_millis(500)));
        let c = check_text(&format!("{HEAD}mode = \"server\"\nallow = \"a\"\n")).unwrap();
        assert_eq!(
            (
                c.services[0].limits.keepalive,
                c.services[0].limits.idle_timeout
            ),
            (None, None)
        );
        for bad in [
            "keepalive = -1",
            "idle_timeout = 1e-10",
            "keepalive = 86401",
        ] {
            let e = err(&format!("{HEAD}mode = \"server\"\nallow = \"a\"\n{bad}\n"));
            assert_eq!(e.what, Problem::OutOfRange(OPTIONAL_SECONDS_RANGE), "{bad}");
        }
    }

    #[test]
    fn suite_and_log_format() {
        let c = check_text(&format!(
            "log_format = \"json\"\n{HEAD}mode = \"server\"\nallow = \"a\"\nsuite = \"chachapoly\"\n"
        ))
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.metrics, None, "no metrics endpoint by default");
        assert_eq!(c.services[0].suite, Some(Suite::ChaChaPolyBlake2s));
        let c = check_text(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nsuite = \"auto\"\n"
        ))
        .unwrap();
        assert_eq!((c.log_format, c.services[0].suite), (LogFormat::Text, None));
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nsuite = \"AESGCM\"\n"
        ));
        assert_eq!(e.key.as_deref(), Some("service.s.suite"));
        let c = check_text(&format!(
            "metrics = \"127.0.0.1:9100\"\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9100"));
        let e = err(&format!(
            "metrics = \"9100\"\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert_eq!(
            parts(&e),
            (
                Some("metrics"),
                Some((1, 11)),
                Problem::Address("write HOST:PORT")
            )
        );
        let e = err(&format!(
            "log_format = 1\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert_eq!(
            parts(&e),
            (
                Some("log_format"),
                Some((1, 14)),
                Problem::Expected("\"text\" or \"json\"")
            )
        );
    }

    /// The example the .deb installs (contrib/tunnel.example.toml) is a
    /// valid configuration.
    #[test]
    fn the_packaged_example_configuration_checks() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/tunnel.example.toml");
        let c = TunnelConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["calendar", "postgres"]);
    }

    /// On Windows, `unix:` and `systemd:` addresses are refused when the
    /// configuration is checked, with an error naming the key (checked
    /// here on any system, with Windows' [`Platform`]).
    #[test]
    fn windows_refuses_unix_and_systemd_addresses_naming_the_key() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let unix = Platform {
            unix_sockets: true,
            socket_activation: true,
        };
        let text = |mode: &str, listen: &str, connect: &str| {
            let trust = match mode {
                "client" => format!("peer = \"{vat}\""),
                _ => "allow = \"a\"".to_string(),
            };
            format!(
                "identity = \"k\"\n[service.s]\nmode = \"{mode}\"\n{trust}\n\
                 listen = \"{listen}\"\nconnect = \"{connect}\"\n"
            )
        };
        let on = |platform, text: &str| {
            TunnelSpec::from_toml(text, file())
                .unwrap()
                .check_on(Origin::File(file()), platform)
        };
        let (no_unix, no_systemd) = (
            "unix: sockets are not available",
            "socket activation is not available",
        );
        for (mode, listen, connect, key, says) in [
            ("client", "unix:/s", "h:1", "service.s.listen", no_unix),
            ("server", "h:1", "unix:/s", "service.s.connect", no_unix),
            (
                "client",
                "systemd:web",
                "h:1",
                "service.s.listen",
                no_systemd,
            ),
            (
                "server",
                "systemd:web",
                "h:1",
                "service.s.listen",
                no_systemd,
            ),
        ] {
            let text = text(mode, listen, connect);
            assert!(on(unix, &text).is_ok(), "{text}");
            let e = on(Platform::WINDOWS, &text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}");
            assert!(
                matches!(e.what, Problem::Address(why) if why.contains(says)),
                "{e}"
            );
            assert!(e.to_string().contains("Windows"), "{e}");
        }
        // TCP is the same everywhere.
        let tcp = text("client", "127.0.0.1:0", "h:1");
        assert!(on(Platform::WINDOWS, &tcp).is_ok());
        // And the command line is checked the same way.
        let spec = TunnelSpec::from_toml(&text("client", "unix:/s", "h:1"), file()).unwrap();
        let e = spec
            .check_on(Origin::CommandLine, Platform::WINDOWS)
            .unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn unix_sockets_are_for_the_plain_side_with_a_mode() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let client = |listen: &str, extra: &str| {
            check_text(&format!(
                "identity = \"k\"\n[service.s]\nmode = \"client\"\npeer = \"{vat}\"\n\
                 listen = \"{listen}\"\nconnect = \"h:1\"\n{extra}"
            ))
        };
        let c = client("unix:/run/t/db.sock", "").unwrap();
        assert_eq!(c.services[0].listen, "unix:/run/t/db.sock");
        assert_eq!(c.services[0].listen_mode, 0o600, "the default");
        for (mode, want) in [("0o660", 0o660), ("\"660\"", 0o660), ("0", 0)] {
            let c = client("unix:/s", &format!("listen_mode = {mode}\n")).unwrap();
            assert_eq!(c.services[0].listen_mode, want, "{mode}");
        }
        for mode in ["660", "0o1000", "\"9\"", "-1"] {
            let e = client("unix:/s", &format!("listen_mode = {mode}\n")).unwrap_err();
            assert_eq!(e.what, Problem::OutOfRange(MODE_RANGE), "{mode}");
        }
        let e = client("127.0.0.1:0", "listen_mode = 0o600\n").unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.what),
            (Some("service.s.listen_mode"), Problem::NotUnix)
        );
        for bad in ["unix:relative.sock", &format!("unix:/{}", "d".repeat(107))] {
            let e = client(bad, "").unwrap_err();
            assert!(matches!(e.what, Problem::Address(_)), "{bad}: {e}");
        }
        // The capnp-noise side is TCP.
        let c = check_text(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"unix:/run/db.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.services[0].connect, "unix:/run/db.sock");
        let e = check_text(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"unix:/s\"\nconnect = \"h:1\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("service.s.listen"));
        assert_eq!(octal_mode("0660"), Ok(0o660));
        // Socket activation: a name systemd passes, for listening.
        let c = client("systemd:web", "").unwrap();
        assert_eq!(c.services[0].listen, "systemd:web");
        for bad in ["systemd:", "systemd:a:b", "systemd:a b"] {
            assert!(
                matches!(client(bad, "").unwrap_err().what, Problem::Address(_)),
                "{bad}"
            );
        }
        let e = check_text(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"systemd:x\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("service.s.connect"));
        assert!(octal_mode("+7").is_err() && octal_mode("1000").is_err());
    }

    #[test]
    fn peer_may_be_a_list_during_a_key_rotation() {
        let (old, new) = (
            Identity::from_seed(&[8; 32]).vat_id(),
            Identity::from_seed(&[9; 32]).vat_id(),
        );
        let c = check_text(&format!(
            "{HEAD}mode = \"client\"\npeer = [\"{old}\", \"{new}\"]\n"
        ))
        .unwrap();
        assert!(matches!(&c.services[0].trust, Trust::PinnedServer(v) if v == &[old, new]));
        let list = format!("peer = [\"{old}\", \"vat1x\"]");
        let e = err(&format!("{HEAD}mode = \"client\"\n{list}\n"));
        let second = list.find("\"vat1x").unwrap() + 1;
        assert_eq!(
            parts(&e),
            (
                Some("service.s.peer"),
                Some((6, second)),
                Problem::NotAVatId
            )
        );
        let e = err(&format!("{HEAD}mode = \"client\"\npeer = []\n"));
        assert_eq!(e.what, Problem::NoTrust(Mode::Client));
    }

    #[test]
    fn via_is_a_client_setting() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let client = |via: &str| {
            check_text(&format!(
                "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nvia = \"{via}\"\n"
            ))
        };
        let c = client("http://127.0.0.1:3128").unwrap();
        assert_eq!(c.services[0].via, Some(Via::Http("127.0.0.1:3128".into())));
        let c = client("socks5://proxy.office:1080").unwrap();
        assert_eq!(
            c.services[0].via,
            Some(Via::Socks5("proxy.office:1080".into()))
        );
        for bad in ["ftp://p:1", "http://p", "http://u:pw@p:1", "socks5://p:0"] {
            let e = client(bad).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("service.s.via"), "{bad}");
            assert!(matches!(e.what, Problem::Address(_)), "{bad}");
        }
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nvia = \"http://p:1\"\n"
        ));
        assert_eq!(e.what, Problem::WrongMode(Mode::Server));
    }

    /// `resumption` and `early_data`: off by default, both ends; early data
    /// only with resumption, and a client resumes only with a pinned peer.
    #[test]
    fn resumption_and_early_data_are_explicit_choices() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let client = |extra: &str| {
            check_text(&format!(
                "{HEAD}mode = \"client\"\npeer = \"{vat}\"\n{extra}"
            ))
        };
        let c = client("").unwrap();
        assert!(
            !c.services[0].resumption && !c.services[0].early_data,
            "off by default"
        );
        let c = client("resumption = true\n").unwrap();
        assert!(c.services[0].resumption && !c.services[0].early_data);
        let c = client("resumption = true\nearly_data = true\n").unwrap();
        assert!(c.services[0].resumption && c.services[0].early_data);
        let e = client("early_data = true\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("service.s.early_data"));
        assert_eq!(e.what, Problem::EarlyDataWithoutResumption);
        let e = client("resumption = \"yes\"\n").unwrap_err();
        assert_eq!(e.what, Problem::Expected("true or false"));
        let e = err(&format!(
            "{HEAD}mode = \"client\"\nknown_vats = \"kv\"\nresumption = true\n"
        ));
        assert_eq!(e.what, Problem::ResumptionWithoutPeer);
        let s = check_text(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nresumption = true\nearly_data = true\n"
        ))
        .unwrap();
        assert!(s.services[0].resumption && s.services[0].early_data);
        // The command line: the same model, named as options.
        let mut spec = TunnelSpec {
            identity: Some("k".into()),
            ..TunnelSpec::default()
        };
        let mut svc = ServiceSpec::new(Mode::Client, "127.0.0.1:0", "h:1");
        svc.peer = vec![vat.to_string()];
        svc.early_data = true;
        spec.services.insert("client".into(), svc);
        let e = spec.check(Origin::CommandLine).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("--early-data: {}", Problem::EarlyDataWithoutResumption)
        );
    }

    #[test]
    fn proxy_protocol_is_a_server_setting() {
        let c = check_text(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nproxy_protocol = \"v2\"\n"
        ))
        .unwrap();
        assert_eq!(c.services[0].proxy_protocol, Some(ProxyProtocol::V2));
        let c = check_text(&format!("{HEAD}mode = \"server\"\nallow = \"a\"\n")).unwrap();
        assert_eq!(c.services[0].proxy_protocol, None, "off by default");
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let e = err(&format!(
            "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nproxy_protocol = \"v1\"\n"
        ));
        assert_eq!(
            parts(&e),
            (
                Some("service.s.proxy_protocol"),
                Some((7, 18)),
                Problem::WrongMode(Mode::Client)
            )
        );
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nproxy_protocol = \"v3\"\n"
        ));
        assert_eq!(e.what, Problem::Expected("\"v1\" or \"v2\""));
    }

    #[test]
    fn trust_settings_must_fit_the_mode() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let what = |text: String| {
            let e = err(&text);
            (e.key.unwrap(), e.what)
        };
        assert_eq!(
            what(format!("{HEAD}mode = \"client\"\n")),
            ("service.s.peer".into(), Problem::NoTrust(Mode::Client))
        );
        assert_eq!(
            what(format!(
                "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nknown_vats = \"kv\"\n"
            )),
            ("service.s.known_vats".into(), Problem::PeerAndKnownVats)
        );
        assert_eq!(
            what(format!(
                "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nallow = \"a\"\n"
            )),
            ("service.s.allow".into(), Problem::WrongMode(Mode::Client))
        );
        assert_eq!(
            what(format!("{HEAD}mode = \"server\"\n")),
            ("service.s.allow".into(), Problem::NoTrust(Mode::Server))
        );
        assert_eq!(
            what(format!(
                "{HEAD}mode = \"server\"\nallow = \"a\"\npeer = \"{vat}\"\n"
            )),
            ("service.s.peer".into(), Problem::WrongMode(Mode::Server))
        );
        assert_eq!(
            Problem::WrongMode(Mode::Server).to_string(),
            "only applies to a client service, and this one is a server"
        );
        let c = check_text(&format!("{HEAD}mode = \"client\"\nknown_vats = \"/kv\"\n")).unwrap();
        assert!(matches!(&c.services[0].trust, Trust::KnownVats(p) if p == Path::new("/kv")));
    }

    #[test]
    fn addresses_names_and_limits_are_checked() {
        for (addr, why) in [
            ("8080", "HOST:PORT"),
            (":8080", "no host"),
            ("::1:8080", "in brackets"),
            ("[::1]]:80", "bracketed IPv6"),
            ("host:http", "not a port number"),
            ("host:70000", "not a port number"),
        ] {
            let text = format!(
                "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"{addr}\"\nconnect = \"h:1\"\n"
            );
            let e = err(&text);
            assert_eq!(e.key.as_deref(), Some("service.s.listen"), "{addr}");
            assert!(
                matches!(e.what, Problem::Address(w) if w.contains(why)),
                "{addr}: {e}"
            );
        }
        let e = err("identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:0\"\n");
        assert_eq!(e.key.as_deref(), Some("service.s.connect"));
        assert_eq!(e.what, Problem::Address("port 0 cannot be connected to"));
        for (setting, key) in [
            ("handshake_timeout = -1", "service.s.handshake_timeout"),
            ("max_connections = -1", "service.s.max_connections"),
            ("max_connections = 1_000_001", "service.s.max_connections"),
            ("connect_timeout = nan", "service.s.connect_timeout"),
        ] {
            let e = err(&format!(
                "{HEAD}mode = \"server\"\nallow = \"a\"\n{setting}\n"
            ));
            assert_eq!(e.key.as_deref(), Some(key), "{setting}");
            assert!(matches!(e.what, Problem::OutOfRange(_)), "{setting}: {e}");
        }
        let e = err(&format!(
            "shutdown_grace = 1e300\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert_eq!(e.key.as_deref(), Some("shutdown_grace"));
        let e = err("identity = \"k\"\n");
        assert_eq!((e.key, e.what), (None, Problem::NoService));
        let e = err(
            "[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n",
        );
        assert_eq!(e.key.as_deref(), Some("identity"));
        assert!(matches!(e.what, Problem::Missing(_)));
    }

    #[test]
    fn the_file_is_read_whole_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let e = TunnelSpec::load(&path).unwrap_err();
        assert_eq!(e.what, Problem::Unreadable(io::ErrorKind::NotFound));
        assert_eq!(e.file.as_deref(), Some(path.as_path()));
        std::fs::write(&path, b"identity = \"\xff\"\n").unwrap();
        assert_eq!(TunnelSpec::load(&path).unwrap_err().what, Problem::NotUtf8);
        std::fs::write(&path, vec![b'#'; MAX_CONFIG_FILE_LEN as usize + 1]).unwrap();
        assert_eq!(TunnelSpec::load(&path).unwrap_err().what, Problem::TooLarge);
    }
}

//! The tunnel's settings: as written ([`TunnelSpec`], from a TOML file or
//! the command line) and as checked ([`TunnelConfig`]).
//!
//! Both sources fill the same [`TunnelSpec`], and one function,
//! [`TunnelSpec::check`], turns it into a [`TunnelConfig`] or explains what
//! is wrong, naming the offending setting the way the user wrote it: a
//! TOML key (`tunnel.toml: service.db.peer: ...`) or a command-line option
//! (`--peer: ...`). See the [module docs](super) for the file format.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use capnp_noise::error::{Error, Result};
use capnp_noise::keyfile::read_limited;
use capnp_noise::vat_id::VatId;

/// Default [`Limits::max_connections`]: 1024 per service.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`Limits::max_handshakes`]: 64 per service.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default [`Limits::max_handshakes_per_source`]: 16 per service and source address.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize =
    capnp_noise::admission::DEFAULT_MAX_HANDSHAKES_PER_SOURCE;
/// Default [`Limits::handshake_timeout`]: 10 seconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Limits::connect_timeout`]: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`TunnelConfig::shutdown_grace`]: 30 seconds.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The largest accepted connection or handshake limit.
pub const MAX_COUNT: usize = 1_000_000;
/// The longest accepted timeout: one day.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The largest configuration file read.
const MAX_CONFIG_FILE_LEN: u64 = 1024 * 1024;

/// The tunnel's settings as written, before [`check`](Self::check).
///
/// Deserializes from the TOML file format (unknown keys are errors); the
/// command line fills the same fields. Durations are in seconds (integer or
/// fractional). The limits given here are the defaults of every service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(from = "RawTunnel")]
#[non_exhaustive]
pub struct TunnelSpec {
    /// The key file of this tunnel's identity (both sides need one).
    pub identity: Option<PathBuf>,
    /// Seconds open connections get to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Option<f64>,
    /// Default limits of the services.
    pub limits: LimitsSpec,
    /// The services by name (`[service.NAME]` tables).
    pub services: BTreeMap<String, ServiceSpec>,
}

/// Connection limits as written; each `None` takes the default.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct LimitsSpec {
    /// Connections open at once, per service.
    pub max_connections: Option<usize>,
    /// Handshakes in progress at once, per service.
    pub max_handshakes: Option<usize>,
    /// Of those, at most this many from one source address.
    pub max_handshakes_per_source: Option<usize>,
    /// Seconds a handshake may take.
    pub handshake_timeout: Option<f64>,
    /// Seconds a TCP connect may take.
    pub connect_timeout: Option<f64>,
}

/// Which end of the tunnel a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Accepts plain TCP locally and connects over capnp-noise.
    Client,
    /// Accepts capnp-noise and connects over plain TCP.
    Server,
}

/// One service as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawService")]
#[non_exhaustive]
pub struct ServiceSpec {
    /// `client` or `server`.
    pub mode: Mode,
    /// The address to listen on, `HOST:PORT` (port 0: any free port).
    pub listen: String,
    /// The address to connect to, `HOST:PORT`.
    pub connect: String,
    /// Client: the server's VatId.
    pub peer: Option<String>,
    /// Client: a known-vats file (trust on first use) instead of `peer`.
    pub known_vats: Option<PathBuf>,
    /// Server: an allow-list file, reloaded when it changes.
    pub allow: Option<PathBuf>,
    /// Server: VatIds allowed in addition to (or instead of) `allow`.
    pub allow_vat: Vec<String>,
    /// Limits of this service (overriding the file's defaults).
    pub limits: LimitsSpec,
}

// The file format. serde's `flatten` does not combine with
// `deny_unknown_fields`, so the limit keys are spelled out at both levels
// and moved into `LimitsSpec` here.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    identity: Option<PathBuf>,
    shutdown_grace: Option<f64>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_handshakes_per_source: Option<usize>,
    handshake_timeout: Option<f64>,
    connect_timeout: Option<f64>,
    #[serde(default)]
    service: BTreeMap<String, ServiceSpec>,
}

impl From<RawTunnel> for TunnelSpec {
    fn from(r: RawTunnel) -> Self {
        TunnelSpec {
            identity: r.identity,
            shutdown_grace: r.shutdown_grace,
            limits: LimitsSpec {
                max_connections: r.max_connections,
                max_handshakes: r.max_handshakes,
                max_handshakes_per_source: r.max_handshakes_per_source,
                handshake_timeout: r.handshake_timeout,
                connect_timeout: r.connect_timeout,
            },
            services: r.service,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    mode: Mode,
    listen: String,
    connect: String,
    peer: Option<String>,
    known_vats: Option<PathBuf>,
    allow: Option<PathBuf>,
    #[serde(default)]
    allow_vat: Vec<String>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_handshakes_per_source: Option<usize>,
    handshake_timeout: Option<f64>,
    connect_timeout: Option<f64>,
}

impl From<RawService> for ServiceSpec {
    fn from(r: RawService) -> Self {
        ServiceSpec {
            mode: r.mode,
            listen: r.listen,
            connect: r.connect,
            peer: r.peer,
            known_vats: r.known_vats,
            allow: r.allow,
            allow_vat: r.allow_vat,
            limits: LimitsSpec {
                max_connections: r.max_connections,
                max_handshakes: r.max_handshakes,
                max_handshakes_per_source: r.max_handshakes_per_source,
                handshake_timeout: r.handshake_timeout,
                connect_timeout: r.connect_timeout,
            },
        }
    }
}

impl ServiceSpec {
    /// A service of the given mode with nothing else set.
    pub fn new(mode: Mode, listen: impl Into<String>, connect: impl Into<String>) -> Self {
        ServiceSpec {
            mode,
            listen: listen.into(),
            connect: connect.into(),
            peer: None,
            known_vats: None,
            allow: None,
            allow_vat: Vec::new(),
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
    /// The name of `key` (of service `service`, if any), as the user wrote it.
    fn name(&self, service: Option<&str>, key: &str) -> String {
        match (self, service) {
            (Origin::File(p), Some(s)) => {
                format!(
                    "{}: service.{}.{key}",
                    p.display(),
                    shorten_to(&shown(s), 40)
                )
            }
            (Origin::File(p), None) => format!("{}: {key}", p.display()),
            (Origin::CommandLine, _) => format!("--{}", key.replace('_', "-")),
        }
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        match self {
            Origin::File(file) if path.is_relative() => file
                .parent()
                .map_or_else(|| path.to_path_buf(), |dir| dir.join(path)),
            _ => path.to_path_buf(),
        }
    }
}

/// The checked settings of a tunnel process.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TunnelConfig {
    /// The key file of the tunnel's identity.
    pub identity: PathBuf,
    /// How long open connections may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The services, sorted by name.
    pub services: Vec<ServiceConfig>,
}

/// One checked service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// Its name (letters, digits, `-`, `_`, `.`), used in logs.
    pub name: String,
    /// The address to listen on (`HOST:PORT`).
    pub listen: String,
    /// The address to connect to (`HOST:PORT`).
    pub connect: String,
    /// Which end of the tunnel, and whom it trusts.
    pub trust: Trust,
    /// Its limits.
    pub limits: Limits,
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
    PinnedServer(VatId),
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
pub struct Limits {
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
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// How long a TCP connect (to the server, or to the target) may take.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl TunnelSpec {
    /// Parses the TOML text of a configuration file; `path` names it in
    /// errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file, the line and the problem (a
    /// syntax error, an unknown key, a value of the wrong type).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            // Not `e.to_string()`: it quotes the offending line of the
            // file, however long, whatever it holds.
            let at =
                e.span()
                    .and_then(|span| text.get(..span.start))
                    .map_or(String::new(), |before| {
                        let line = before.matches('\n').count() + 1;
                        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                        format!("line {line}, column {column}: ")
                    });
            Error::Config(format!(
                "{}: {at}{}",
                path.display(),
                shorten_quoted(e.message())
            ))
        })
    }

    /// Reads and parses a configuration file.
    ///
    /// # Errors
    /// [`Error::Key`] if it cannot be read; see [`from_toml`](Self::from_toml).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_limited(path, MAX_CONFIG_FILE_LEN, "configuration file")?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::Config(format!("{}: is not UTF-8 text", path.display())))?;
        Self::from_toml(text, path)
    }

    /// Checks every setting and fills in the defaults.
    ///
    /// # Errors
    /// [`Error::Config`] for the first problem, naming the setting as
    /// `origin` wrote it: a missing identity or service, an invalid service
    /// name or address, a malformed VatId, settings of the wrong mode or
    /// missing trust settings, a limit out of range.
    pub fn check(&self, origin: Origin<'_>) -> Result<TunnelConfig> {
        let identity = self.identity.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "{} is required: the key file of this tunnel's identity (create one with `capnp-noise keygen`)",
                origin.name(None, "identity")
            ))
        })?;
        if self.services.is_empty() {
            return Err(Error::Config(match origin {
                Origin::File(p) => format!(
                    "{}: no service is configured; add a [service.NAME] table",
                    p.display()
                ),
                Origin::CommandLine => "no service is configured".into(),
            }));
        }
        let defaults = self.limits.check(origin, None, Limits::default())?;
        let services = self
            .services
            .iter()
            .map(|(name, spec)| spec.check(name, origin, defaults))
            .collect::<Result<Vec<_>>>()?;
        Ok(TunnelConfig {
            identity: origin.resolve(identity),
            shutdown_grace: seconds(
                self.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
                &origin.name(None, "shutdown_grace"),
            )?,
            services,
        })
    }
}

impl TunnelConfig {
    /// Reads, parses and checks a configuration file.
    ///
    /// # Errors
    /// See [`TunnelSpec::load`] and [`TunnelSpec::check`].
    pub fn load(path: &Path) -> Result<Self> {
        TunnelSpec::load(path)?.check(Origin::File(path))
    }
}

impl LimitsSpec {
    fn check(&self, origin: Origin<'_>, service: Option<&str>, base: Limits) -> Result<Limits> {
        let name = |key| origin.name(service, key);
        Ok(Limits {
            max_connections: count(
                self.max_connections,
                base.max_connections,
                &name("max_connections"),
            )?,
            max_handshakes: count(
                self.max_handshakes,
                base.max_handshakes,
                &name("max_handshakes"),
            )?,
            max_handshakes_per_source: count(
                self.max_handshakes_per_source,
                base.max_handshakes_per_source,
                &name("max_handshakes_per_source"),
            )?,
            handshake_timeout: seconds(
                self.handshake_timeout,
                base.handshake_timeout,
                &name("handshake_timeout"),
            )?,
            connect_timeout: seconds(
                self.connect_timeout,
                base.connect_timeout,
                &name("connect_timeout"),
            )?,
        })
    }
}

impl ServiceSpec {
    fn check(&self, name: &str, origin: Origin<'_>, defaults: Limits) -> Result<ServiceConfig> {
        let key = |k: &str| origin.name(Some(name), k);
        let bad = |k: &str, why: String| Error::Config(format!("{}: {why}", key(k)));
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::Config(format!(
                "{}: invalid service name {:?}: use letters, digits, '-', '_' and '.'",
                match origin {
                    Origin::File(p) => p.display().to_string(),
                    Origin::CommandLine => "--name".into(),
                },
                shown(name)
            )));
        }
        check_address(&self.listen, true).map_err(|why| bad("listen", why))?;
        check_address(&self.connect, false).map_err(|why| bad("connect", why))?;
        // Only text that starts like a VatId is quoted back: anything else
        // may be a key pasted into the wrong place.
        let parse_vat = |k: &str, text: &str| {
            let text = text.trim();
            text.parse::<VatId>().map_err(|e| {
                bad(
                    k,
                    if text.starts_with("vat1") && !text.contains(PEM_MARKER) {
                        format!("{:?} is not a VatId: {e}", shorten(text))
                    } else {
                        "this is not a VatId (one starts with \"vat1\"); the text is not shown in case it is a secret".into()
                    },
                )
            })
        };
        let wrong_mode = |k: &str, other: &str| {
            Error::Config(format!(
                "{} only applies to a {other} service, and this one is a {}",
                key(k),
                match self.mode {
                    Mode::Client => "client",
                    Mode::Server => "server",
                }
            ))
        };
        let trust = match self.mode {
            Mode::Client => {
                if self.allow.is_some() {
                    return Err(wrong_mode("allow", "server"));
                }
                if !self.allow_vat.is_empty() {
                    return Err(wrong_mode("allow_vat", "server"));
                }
                match (&self.peer, &self.known_vats) {
                    (Some(peer), None) => Trust::PinnedServer(parse_vat("peer", peer)?),
                    (None, Some(file)) => Trust::KnownVats(origin.resolve(file)),
                    (Some(_), Some(_)) => {
                        return Err(Error::Config(format!(
                            "{} and {} exclude each other: pin the server's VatId, or trust it on first use",
                            key("peer"),
                            key("known_vats")
                        )))
                    }
                    (None, None) => {
                        return Err(Error::Config(format!(
                            "a client service needs {} (the server's VatId) or {} (a trust-on-first-use file)",
                            key("peer"),
                            key("known_vats")
                        )))
                    }
                }
            }
            Mode::Server => {
                if self.peer.is_some() {
                    return Err(wrong_mode("peer", "client"));
                }
                if self.known_vats.is_some() {
                    return Err(wrong_mode("known_vats", "client"));
                }
                if self.allow.is_none() && self.allow_vat.is_empty() {
                    return Err(Error::Config(format!(
                        "a server service needs {} (an allow-list file) and/or {} (allowed VatIds)",
                        key("allow"),
                        key("allow_vat")
                    )));
                }
                Trust::AllowedClients {
                    file: self.allow.as_deref().map(|f| origin.resolve(f)),
                    vat_ids: self
                        .allow_vat
                        .iter()
                        .map(|v| parse_vat("allow_vat", v))
                        .collect::<Result<_>>()?,
                }
            }
        };
        Ok(ServiceConfig {
            name: name.to_string(),
            listen: self.listen.clone(),
            connect: self.connect.clone(),
            trust,
            limits: self.limits.check(origin, Some(name), defaults)?,
        })
    }
}

/// A parser's message on one line, at most 300 characters, each stretch
/// between two quote characters (`` ` `` or `"`) at most 80: the parser
/// does not escape quotes inside the values it quotes, so pairing them up
/// would let a value holding one escape.
fn shorten_quoted(msg: &str) -> String {
    // Nothing after a PEM marker, whichever quotes the key holds.
    let cut;
    let msg = match msg.find(PEM_MARKER) {
        Some(i) => {
            cut = format!("{}...", &msg[..i + PEM_MARKER.len()]);
            &cut
        }
        None => msg,
    };
    let pieces: Vec<&str> = msg.trim().split(['`', '"']).collect();
    let mut out = String::new();
    let mut quotes = msg.trim().matches(['`', '"']);
    for (i, piece) in pieces.iter().enumerate() {
        if i == 0 || i == pieces.len() - 1 {
            out.push_str(piece);
        } else {
            out.push_str(&shown(piece));
        }
        out.extend(quotes.next());
    }
    shorten_to(&out.split_whitespace().collect::<Vec<_>>().join(" "), 300)
}

/// Keeps error messages short when someone pastes a whole file.
fn shorten(s: &str) -> String {
    shorten_to(s, 80)
}

/// What starts a PEM block: errors show nothing after it.
const PEM_MARKER: &str = "-----BEGIN";

/// A value as errors quote it: at most 80 characters, and nothing after a
/// PEM marker (a key file pasted into the wrong place).
fn shown(s: &str) -> String {
    match s.find(PEM_MARKER) {
        Some(i) => {
            let mut t = shorten(&s[..i + PEM_MARKER.len()]);
            if !t.ends_with("...") {
                t.push_str("...");
            }
            t
        }
        None => shorten(s),
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn shorten_to(s: &str, max: usize) -> String {
    if s.chars().count() > max {
        let mut t: String = s.chars().take(max - 3).collect();
        t.push_str("...");
        t
    } else {
        s.to_string()
    }
}

/// Checks the form `HOST:PORT` (IPv6 in brackets); resolving the host is
/// left to binding or connecting.
fn check_address(addr: &str, port_zero_ok: bool) -> std::result::Result<(), String> {
    // Quoted shortened: a long value must not come back whole.
    let a = shown(addr);
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{a:?} is not HOST:PORT"));
    };
    let (h, p) = if addr.contains(PEM_MARKER) {
        (a.clone(), a.clone())
    } else {
        (shown(host), shown(port))
    };
    if host.is_empty() {
        return Err(format!("{a:?} has no host (write e.g. 127.0.0.1{a})"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
        if !ok {
            return Err(format!("{a:?}: {h:?} is not a bracketed IPv6 address"));
        }
    } else if host.contains(':') {
        return Err(format!(
            "{a:?}: write an IPv6 address in brackets, e.g. [::1]:{p}"
        ));
    } else if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{a:?}: the host contains spaces"));
    }
    match port.parse::<u16>() {
        Ok(0) if !port_zero_ok => Err(format!("{a:?}: port 0 cannot be connected to")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{a:?}: {p:?} is not a port number (0-65535)")),
    }
}

fn count(value: Option<usize>, default: usize, name: &str) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        Some(n) => Err(Error::Config(format!(
            "{name}: {n} is out of range (1 to {MAX_COUNT})"
        ))),
    }
}

fn seconds(value: Option<f64>, default: Duration, name: &str) -> Result<Duration> {
    match value {
        None => Ok(default),
        // `1e-10` is above 0 but no whole nanosecond: it must not become a
        // zero timeout.
        Some(s) if s > 0.0 && s <= MAX_SECONDS && !Duration::from_secs_f64(s).is_zero() => {
            Ok(Duration::from_secs_f64(s))
        }
        Some(s) => Err(Error::Config(format!(
            "{name}: {s} is out of range (a number of seconds, at least a nanosecond, at most {MAX_SECONDS})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_noise::Identity;

    fn file() -> &'static Path {
        Path::new("/etc/tunnel.toml")
    }

    fn check_text(text: &str) -> Result<TunnelConfig> {
        TunnelSpec::from_toml(text, file())?.check(Origin::File(file()))
    }

    fn err(text: &str) -> String {
        check_text(text).unwrap_err().to_string()
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
        assert!(matches!(db.trust, Trust::PinnedServer(v) if v == server_vat));
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
    fn unknown_keys_are_errors_with_their_line() {
        let e = err(&format!("{HEAD}mode = \"client\"\npeeer = \"x\"\n"));
        assert!(e.contains("/etc/tunnel.toml"), "{e}");
        assert!(e.contains("unknown field `peeer`"), "{e}");
        assert!(e.contains("line 6"), "{e}");
        let e = err("identiti = \"k\"\n");
        assert!(e.contains("unknown field `identiti`"), "{e}");
        let e = err(&format!("{HEAD}mode = \"proxy\"\n"));
        assert!(e.contains("unknown variant `proxy`"), "{e}");
    }

    #[test]
    fn a_bad_vat_id_names_the_setting() {
        let e = err(&format!("{HEAD}mode = \"client\"\npeer = \"vat1nope\"\n"));
        assert!(
            e.contains("/etc/tunnel.toml: service.s.peer: \"vat1nope\" is not a VatId"),
            "{e}"
        );
        let e = err(&format!("{HEAD}mode = \"server\"\nallow_vat = [\"abc\"]\n"));
        assert!(e.contains("service.s.allow_vat:"), "{e}");
        let mut spec = TunnelSpec {
            identity: Some("k".into()),
            ..TunnelSpec::default()
        };
        let mut svc = ServiceSpec::new(Mode::Client, "127.0.0.1:0", "h:1");
        svc.peer = Some("vat1nope".into());
        spec.services.insert("client".into(), svc);
        let e = spec.check(Origin::CommandLine).unwrap_err().to_string();
        assert!(
            e.starts_with("configuration error: --peer: \"vat1nope\""),
            "{e}"
        );
    }

    #[test]
    fn a_key_pasted_as_a_vat_id_is_not_repeated() {
        // Found by the tunnel_config fuzz target's seed: the whole PEM
        // text came back in the error.
        let pem = Identity::from_seed(&[4; 32]).to_pkcs8_pem().to_string();
        let body = pem.lines().nth(1).unwrap();
        let e = err(&format!(
            "{HEAD}mode = \"client\"\npeer = \"\"\"{pem}\"\"\"\n"
        ));
        assert!(e.contains("service.s.peer: this is not a VatId"), "{e}");
        assert!(!e.contains(&body[..16]) && !e.contains("BEGIN"), "{e}");
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow_vat = [\"{body}\"]\n"
        ));
        assert!(
            e.contains("service.s.allow_vat: this is not a VatId"),
            "{e}"
        );
        assert!(!e.contains(&body[..16]), "{e}");
    }

    #[test]
    fn a_syntax_error_does_not_quote_the_line() {
        // Found by the tunnel_config fuzz target: toml's message quotes the
        // whole offending line (here a key pasted into a string, with a
        // control character making it invalid).
        let secret = "MC4CAQAwBQYDK2VwBCIEI";
        let line = format!("peer = \"{secret}\u{1}{}\"", "A".repeat(10_000));
        let e = err(&format!("{HEAD}mode = \"client\"\n{line}\n"));
        assert!(e.contains("/etc/tunnel.toml: line 6, column "), "{e:.300}");
        assert!(!e.contains(secret) && e.len() < 300, "{e:.300}");
        let long_key = "k".repeat(10_000);
        let e = err(&format!("{HEAD}{long_key} = 1\n"));
        assert!(
            e.contains("unknown field `kkkk") && e.len() < 400,
            "{e:.500}"
        );
    }

    #[test]
    fn long_addresses_and_names_are_shortened_in_errors() {
        // Found by the tunnel_config fuzz target: a long `connect` came back
        // whole (twice for a bad port).
        let long = "*".repeat(10_000);
        let e = err(&format!(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2{long}\"\n"
        ));
        assert!(
            e.contains("service.s.connect: \"h:2***") && e.len() < 300,
            "{e:.400}"
        );
        let name = "n".repeat(10_000);
        let e = err(&format!(
            "identity = \"k\"\n[service.{name}]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h\"\nconnect = \"h:2\"\n"
        ));
        assert!(
            e.contains(&format!("service.{}....listen", &name[..37])),
            "{e:.400}"
        );
        assert!(e.len() < 200, "{e:.400}");
        let e = err(&format!(
            "identity = \"k\"\n[service.\"{name} \"]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n"
        ));
        assert!(
            e.contains("invalid service name \"nnn") && e.len() < 300,
            "{e:.400}"
        );
    }

    #[test]
    fn a_quote_inside_a_value_does_not_escape_shortening() {
        // Found by the tunnel_config fuzz target: toml quotes an unknown
        // variant between backticks without escaping the backticks in it.
        let value = format!("{}`{}", "a".repeat(30), "b".repeat(200));
        let e = err(&format!("{HEAD}mode = \"{value}\"\n"));
        assert!(e.contains("unknown variant `aaa"), "{e}");
        assert!(e.contains(&format!("`{}...", "b".repeat(77))), "{e}");
        assert!(!e.contains(&"b".repeat(78)), "{e}");
    }

    #[test]
    fn nothing_after_a_pem_marker_is_quoted() {
        // Found by the tunnel_config fuzz target: toml quoted a `mode`
        // holding a pasted key, and 80 characters of it came back.
        let pem = Identity::from_seed(&[6; 32]).to_pkcs8_pem().to_string();
        let body = &pem.lines().nth(1).unwrap()[..16];
        for setting in ["mode = \"\"\"x", "mode = \"client\"\npeer = \"\"\"vat1"] {
            let e = err(&format!("{HEAD}{setting}{pem}\"\"\"\n"));
            assert!(
                e.contains("unknown variant `x-----BEGIN...") || e.contains("not a VatId"),
                "{e}"
            );
            assert!(!e.contains(body) && !e.contains("PRIVATE"), "{e}");
        }
        let e = err(&format!(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"\"\"{pem}\"\"\"\n"
        ));
        assert!(e.contains("service.s.connect: \"-----BEGIN...\""), "{e}");
        assert!(!e.contains(body), "{e}");
        // A quote inside the key, or a colon, must not let the rest through.
        let quoted = pem.replacen('\n', "`\n", 2);
        let e = err(&format!("{HEAD}mode = \"\"\"x{quoted}\"\"\"\n"));
        assert!(!e.contains(body) && !e.contains("PRIVATE"), "{e}");
        let colon = pem.replacen("MC4C", "MC:4C", 1);
        let e = err(&format!(
            "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"\"\"{colon}\"\"\"\n"
        ));
        assert!(!e.contains(&body[4..]), "{e}");
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
            assert!(
                e.contains(&format!("{key}: 0.0000000001 is out of range")),
                "{e}"
            );
        }
        let c = check_text(&format!(
            "handshake_timeout = 1e-9\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.services[0].limits.handshake_timeout,
            Duration::from_nanos(1)
        );
    }

    #[test]
    fn trust_settings_must_fit_the_mode() {
        let vat = Identity::from_seed(&[3; 32]).vat_id();
        let e = err(&format!("{HEAD}mode = \"client\"\n"));
        assert!(e.contains("needs /etc/tunnel.toml: service.s.peer"), "{e}");
        let e = err(&format!(
            "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nknown_vats = \"kv\"\n"
        ));
        assert!(e.contains("exclude each other"), "{e}");
        let e = err(&format!(
            "{HEAD}mode = \"client\"\npeer = \"{vat}\"\nallow = \"a\"\n"
        ));
        assert!(
            e.contains("service.s.allow only applies to a server service"),
            "{e}"
        );
        let e = err(&format!("{HEAD}mode = \"server\"\n"));
        assert!(
            e.contains("needs") && e.contains("service.s.allow_vat"),
            "{e}"
        );
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\npeer = \"{vat}\"\n"
        ));
        assert!(
            e.contains("service.s.peer only applies to a client service"),
            "{e}"
        );
        let c = check_text(&format!("{HEAD}mode = \"client\"\nknown_vats = \"/kv\"\n")).unwrap();
        assert!(matches!(&c.services[0].trust, Trust::KnownVats(p) if p == Path::new("/kv")));
    }

    #[test]
    fn addresses_names_and_limits_are_checked() {
        for (addr, why) in [
            ("8080", "is not HOST:PORT"),
            (":8080", "has no host"),
            ("::1:8080", "in brackets"),
            ("[::1]]:80", "bracketed IPv6"),
            ("host:http", "not a port number"),
            ("host:70000", "not a port number"),
        ] {
            let text = format!(
                "identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"{addr}\"\nconnect = \"h:1\"\n"
            );
            let e = err(&text);
            assert!(
                e.contains("service.s.listen") && e.contains(why),
                "{addr}: {e}"
            );
        }
        let e = err("identity = \"k\"\n[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:0\"\n");
        assert!(
            e.contains("service.s.connect") && e.contains("port 0"),
            "{e}"
        );
        let e = err("identity = \"k\"\n[service.\"a b\"]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n");
        assert!(e.contains("invalid service name \"a b\""), "{e}");
        let e = err(&format!(
            "max_handshakes = 0\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert!(
            e.contains("/etc/tunnel.toml: max_handshakes: 0 is out of range"),
            "{e}"
        );
        let e = err(&format!(
            "{HEAD}mode = \"server\"\nallow = \"a\"\nhandshake_timeout = -1\n"
        ));
        assert!(
            e.contains("service.s.handshake_timeout: -1 is out of range"),
            "{e}"
        );
        let e = err(&format!(
            "shutdown_grace = 1e300\n{HEAD}mode = \"server\"\nallow = \"a\"\n"
        ));
        assert!(e.contains("shutdown_grace"), "{e}");
        let e = err("identity = \"k\"\n");
        assert!(e.contains("no service is configured"), "{e}");
        let e = err(
            "[service.s]\nmode = \"server\"\nallow = \"a\"\nlisten = \"h:1\"\nconnect = \"h:2\"\n",
        );
        assert!(e.contains("identity is required"), "{e}");
    }
}

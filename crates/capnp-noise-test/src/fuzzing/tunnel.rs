//! Target for the tunnel's configuration file: [`TunnelSpec::from_toml`]
//! then [`TunnelSpec::check`].
//!
//! Besides "no panic", it checks that an accepted configuration holds only
//! what the documentation allows (limits from 1 to a million, durations
//! above zero and at most a day, `HOST:PORT` addresses, trust settings of
//! the service's mode, defaults where nothing was written), that the spec
//! written back as TOML reads as the same spec, and that an error is
//! exactly its parts (file, a line and column within the input, a key, a
//! fixed phrase): the key made of known names, a service name of the
//! documented form or a short plain unknown key, so that no long stretch
//! of the input, and nothing of a private key pasted into a value, comes
//! back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::support::{initiator_identity, responder_identity};
use super::Seed;
use capnp_noise::VatId;
use capnp_noise_tunnel::config::{
    ConfigError, LimitsSpec, LogFormat, Mode, Origin, Problem, Trust, TunnelConfig, TunnelSpec,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_LISTEN_MODE,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
    DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE, DEFAULT_SHUTDOWN_GRACE, MAX_COUNT, MAX_SECONDS,
    MAX_SERVICE_NAME,
};

/// The file the target "reads": absolute, so relative paths resolve
/// against its directory.
const CONFIG_PATH: &str = "/etc/capnp-noise/tunnel.toml";
/// The longest error message accepted, whatever the input, the file's
/// path excluded.
const MAX_ERROR_LEN: usize = 400;
/// The keys of the file format, in every table.
const KEYS: &[&str] = &[
    "identity",
    "shutdown_grace",
    "log_format",
    "metrics",
    "workers",
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_source",
    "max_unauthenticated_per_source",
    "handshake_timeout",
    "connect_timeout",
    "keepalive",
    "idle_timeout",
    "service",
    "mode",
    "listen",
    "connect",
    "listen_mode",
    "peer",
    "known_vats",
    "allow",
    "allow_vat",
    "proxy_protocol",
    "via",
    "suite",
    "resumption",
    "early_data",
];

/// `tunnel_config`: [`TunnelSpec::from_toml`] and [`TunnelSpec::check`]
/// (as from a file and as from the command line) over arbitrary text.
pub fn tunnel_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(CONFIG_PATH);
    let spec = match TunnelSpec::from_toml(text, path) {
        Ok(spec) => spec,
        Err(e) => return assert_good_error(text, &e, Some(path)),
    };
    assert_round_trip(&spec);
    for origin in [Origin::File(path), Origin::CommandLine] {
        match spec.check(origin) {
            Ok(config) => assert_as_documented(&spec, &config, origin),
            Err(e) => assert_good_error(
                text,
                &e,
                match origin {
                    Origin::File(p) => Some(p),
                    Origin::CommandLine => None,
                },
            ),
        }
    }
}

/// An error is its parts and nothing else; see the module docs.
fn assert_good_error(text: &str, e: &ConfigError, file: Option<&Path>) {
    let msg = e.to_string();
    assert_eq!(e.file.as_deref(), file, "{msg}");
    let mut parts = Vec::new();
    parts.extend(file.map(|f| f.display().to_string()));
    if let Some(p) = e.position {
        let line = text.split('\n').nth(p.line - 1).expect("the line exists");
        assert!(
            p.column >= 1 && p.column <= line.chars().count() + 1,
            "column {} beyond line {}: {msg}",
            p.column,
            p.line
        );
        parts.push(format!("line {}, column {}", p.line, p.column));
    }
    if let Some(key) = &e.key {
        assert_key_is_a_name(key, e.what, file.is_none());
        parts.push(key.clone());
    }
    parts.push(e.what.to_string());
    assert_eq!(msg, parts.join(": "), "an error holds more than its parts");
    let shown = file.map_or(msg.len(), |f| msg.len() - f.display().to_string().len());
    assert!(
        shown <= MAX_ERROR_LEN,
        "the error grows with the input ({shown} characters): {msg:.300}"
    );
    if e.what == Problem::Syntax {
        assert!(e.key.is_none(), "a syntax error names a key: {msg}");
    }
    for secret in pem_bodies_in_values(text) {
        // A run that also occurs elsewhere in the file (as a service's
        // name, say) may come back from there.
        if text.matches(&secret).count() > 1 {
            continue;
        }
        assert!(
            !msg.contains(&secret),
            "the error repeats a PEM body: {secret:?}"
        );
    }
}

/// `key` is a command-line option (`--NAME`), or a key path of known key
/// names, a service name of the documented form, and for an unknown key a
/// name of at most 32 lowercase letters, digits and `_`.
fn assert_key_is_a_name(key: &str, what: Problem, command_line: bool) {
    if command_line {
        let name = key.strip_prefix("--").expect("an option").replace('-', "_");
        assert!(
            name == "name" || KEYS.contains(&name.as_str()),
            "not an option: {key}"
        );
        return;
    }
    let service_name = |name: &str| {
        !name.is_empty()
            && name.len() <= MAX_SERVICE_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let plain_unknown = |k: &str| {
        what == Problem::UnknownKey
            && k.len() <= 32
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let known = |k: &str| KEYS.contains(&k) || plain_unknown(k);
    let ok = match key.strip_prefix("service.") {
        None => key == "service" || known(key),
        // service.NAME.KEY (NAME may hold dots), or service.NAME for an
        // unknown key whose name is not shown.
        Some(rest) => {
            (what == Problem::UnknownKey && service_name(rest))
                || rest
                    .rsplit_once('.')
                    .is_some_and(|(name, k)| service_name(name) && known(k))
        }
    };
    assert!(
        ok,
        "not a key of the documented form ({what:?}): {key:.200}"
    );
}

/// The beginnings of the PEM bodies in the string values of `text` (if it
/// parses): what a key pasted into a value starts with.
fn pem_bodies_in_values(text: &str) -> Vec<String> {
    fn strings(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.extend(pem_bodies(s).into_iter().map(str::to_string)),
            toml::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        table.values().for_each(|v| strings(v, &mut out));
    }
    out
}

/// The first 16 base64 characters of each run of 16 or more found within
/// 200 characters after a PEM header (`-----BEGIN LABEL-----`), before the
/// string holding it ends: what a pasted key file starts with.
fn pem_bodies(text: &str) -> Vec<&str> {
    let mut v = Vec::new();
    for (at, _) in text.match_indices("-----BEGIN") {
        let rest = &text[at + 10..];
        // A PEM header: `-----BEGIN LABEL-----` on one line, the label in
        // upper case letters, digits and spaces.
        let Some(close) = rest.find("-----") else {
            continue;
        };
        let label = &rest[..close];
        if !label.starts_with(' ')
            || label.trim().is_empty()
            || !label
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ')
        {
            continue;
        }
        // The body, up to the end of the string that holds it.
        let body = &rest[close + 5..];
        let body = &body[..body.find(['"', '\'']).unwrap_or(body.len())];
        let end = body.char_indices().nth(200).map_or(body.len(), |(i, _)| i);
        v.extend(
            body[..end]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/'))
                .filter(|run| run.len() >= 16)
                .map(|run| &run[..16]),
        );
    }
    v
}

/// The spec written back as TOML (the file format) reads as the same spec.
///
/// Skipped when a count exceeds `i64::MAX`: toml reads such an integer into
/// a `usize`, but TOML integers are 64-bit signed, so nothing writes it back
/// (and `check` refuses it anyway).
fn assert_round_trip(spec: &TunnelSpec) {
    let too_big = |l: &LimitsSpec| {
        [l.max_connections, l.max_handshakes]
            .iter()
            .flatten()
            .any(|&n| i64::try_from(n).is_err())
    };
    let workers_too_big = spec.workers.is_some_and(|w| i64::try_from(w).is_err());
    if workers_too_big
        || too_big(&spec.limits)
        || spec.services.values().any(|s| too_big(&s.limits))
    {
        return;
    }
    let written = render(spec);
    let back = TunnelSpec::from_toml(&written, Path::new(CONFIG_PATH))
        .unwrap_or_else(|e| panic!("a written spec does not parse: {e}\n{written:.500}"));
    assert_eq!(
        format!("{back:?}"),
        format!("{spec:?}"),
        "the spec does not round trip through:\n{written:.500}"
    );
}

fn render(spec: &TunnelSpec) -> String {
    let mut top = toml::Table::new();
    let path = |p: &PathBuf| toml::Value::String(p.to_str().expect("TOML text").to_owned());
    if let Some(p) = &spec.identity {
        top.insert("identity".into(), path(p));
    }
    if let Some(f) = spec.log_format {
        let name = match f {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        top.insert("log_format".into(), name.into());
    }
    if let Some(m) = &spec.metrics {
        top.insert("metrics".into(), m.clone().into());
    }
    if let Some(s) = spec.shutdown_grace {
        top.insert("shutdown_grace".into(), s.into());
    }
    if let Some(w) = spec.workers {
        let w = i64::try_from(w).expect("assert_round_trip skips counts over i64::MAX");
        top.insert("workers".into(), w.into());
    }
    put_limits(&mut top, &spec.limits);
    let mut services = toml::Table::new();
    for (name, s) in &spec.services {
        let mut t = toml::Table::new();
        let mode = match s.mode {
            Mode::Client => "client",
            Mode::Server => "server",
        };
        t.insert("mode".into(), mode.into());
        t.insert("listen".into(), s.listen.clone().into());
        t.insert("connect".into(), s.connect.clone().into());
        if let Some(m) = s.listen_mode {
            t.insert("listen_mode".into(), toml::Value::Integer(m.into()));
        }
        if !s.peer.is_empty() {
            t.insert("peer".into(), s.peer.clone().into());
        }
        if let Some(p) = &s.known_vats {
            t.insert("known_vats".into(), path(p));
        }
        if let Some(p) = &s.allow {
            t.insert("allow".into(), path(p));
        }
        if !s.allow_vat.is_empty() {
            t.insert("allow_vat".into(), s.allow_vat.clone().into());
        }
        if let Some(v) = s.proxy_protocol {
            t.insert("proxy_protocol".into(), v.as_str().into());
        }
        if let Some(v) = &s.via {
            t.insert("via".into(), v.clone().into());
        }
        if let Some(v) = s.suite {
            t.insert("suite".into(), v.as_str().into());
        }
        if s.resumption {
            t.insert("resumption".into(), true.into());
        }
        if s.early_data {
            t.insert("early_data".into(), true.into());
        }
        put_limits(&mut t, &s.limits);
        services.insert(name.clone(), t.into());
    }
    if !services.is_empty() {
        top.insert("service".into(), services.into());
    }
    toml::to_string(&top).expect("a table serializes")
}

fn put_limits(t: &mut toml::Table, l: &LimitsSpec) {
    let int = |n: usize| toml::Value::Integer(i64::try_from(n).expect("read from an i64"));
    if let Some(n) = l.max_connections {
        t.insert("max_connections".into(), int(n));
    }
    if let Some(n) = l.max_handshakes {
        t.insert("max_handshakes".into(), int(n));
    }
    if let Some(n) = l.max_handshakes_per_source {
        t.insert("max_handshakes_per_source".into(), int(n));
    }
    if let Some(n) = l.max_unauthenticated_per_source {
        t.insert("max_unauthenticated_per_source".into(), int(n));
    }
    if let Some(s) = l.handshake_timeout {
        t.insert("handshake_timeout".into(), s.into());
    }
    if let Some(s) = l.connect_timeout {
        t.insert("connect_timeout".into(), s.into());
    }
    if let Some(s) = l.keepalive {
        t.insert("keepalive".into(), s.into());
    }
    if let Some(s) = l.idle_timeout {
        t.insert("idle_timeout".into(), s.into());
    }
}

/// Every field of an accepted configuration is what the documentation
/// promises for what was written.
fn assert_as_documented(spec: &TunnelSpec, config: &TunnelConfig, origin: Origin<'_>) {
    let resolve = |p: &Path| match origin {
        Origin::File(f) if p.is_relative() => f.parent().expect("absolute").join(p),
        _ => p.to_path_buf(),
    };
    let identity = spec.identity.as_deref().expect("identity is required");
    assert_eq!(config.identity, resolve(identity));
    assert_duration(
        config.shutdown_grace,
        spec.shutdown_grace,
        DEFAULT_SHUTDOWN_GRACE,
    );
    assert_eq!(
        config.log_format,
        spec.log_format.unwrap_or(LogFormat::Text)
    );
    assert_eq!(config.metrics, spec.metrics);
    if let Some(m) = &config.metrics {
        assert_host_port(m, true);
    }
    assert!(!config.services.is_empty(), "a config without services");
    assert_eq!(config.services.len(), spec.services.len());
    for ((name, s), c) in spec.services.iter().zip(&config.services) {
        assert_eq!(&c.name, name, "services are sorted by name");
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')),
            "invalid service name {name:?} accepted"
        );
        assert_eq!((&c.listen, &c.connect), (&s.listen, &s.connect));
        // A Unix socket only on the plain side: a client's listen, a
        // server's connect.
        assert_endpoint(&c.listen, true, s.mode == Mode::Client);
        assert_endpoint(&c.connect, false, s.mode == Mode::Server);
        match s.listen_mode {
            Some(m) => {
                // (Not with a socket systemd passes: it has its own mode.)
                assert!(c.listen.starts_with("unix:"), "listen_mode for TCP");
                assert_eq!(c.listen_mode, m);
            }
            None => assert_eq!(c.listen_mode, DEFAULT_LISTEN_MODE),
        }
        assert!(c.listen_mode <= 0o777, "mode {:o}", c.listen_mode);
        assert_eq!(c.mode(), s.mode);
        let vat = |t: &str| t.trim().parse::<VatId>().expect("an accepted VatId parses");
        match (&c.trust, s.mode) {
            (Trust::PinnedServer(v), Mode::Client) => {
                assert!(!v.is_empty(), "a client pinning no VatId");
                let written: Vec<VatId> = s.peer.iter().map(|t| vat(t)).collect();
                assert_eq!(*v, written);
                assert!(s.known_vats.is_none());
            }
            (Trust::KnownVats(p), Mode::Client) => {
                assert!(s.peer.is_empty());
                assert_eq!(*p, resolve(s.known_vats.as_deref().expect("known_vats")));
            }
            (Trust::AllowedClients { file, vat_ids }, Mode::Server) => {
                assert!(s.peer.is_empty() && s.known_vats.is_none());
                assert!(
                    file.is_some() || !vat_ids.is_empty(),
                    "a server trusts nobody"
                );
                assert_eq!(*file, s.allow.as_deref().map(resolve));
                let written: Vec<VatId> = s.allow_vat.iter().map(|t| vat(t)).collect();
                assert_eq!(*vat_ids, written);
            }
            (trust, mode) => panic!("{mode:?} service with {trust:?}"),
        }
        if s.mode == Mode::Client {
            assert!(s.allow.is_none() && s.allow_vat.is_empty() && s.proxy_protocol.is_none());
        }
        assert_eq!(c.proxy_protocol, s.proxy_protocol);
        assert_eq!((c.resumption, c.early_data), (s.resumption, s.early_data));
        assert!(
            !c.early_data || c.resumption,
            "early data without resumption"
        );
        assert!(
            !(c.resumption && s.mode == Mode::Client && s.known_vats.is_some()),
            "a client resuming with known_vats"
        );
        match (&c.via, &s.via) {
            (None, None) => {}
            (Some(v), Some(text)) => {
                assert_eq!(s.mode, Mode::Client, "a server with via");
                assert_eq!(text.trim_end_matches('/'), v.to_string());
                assert_host_port(v.proxy(), false);
            }
            (got, written) => panic!("via {written:?} became {got:?}"),
        }
        assert_eq!(c.suite, s.suite.and_then(|v| v.suite()));
        let (own, top) = (&s.limits, &spec.limits);
        let l = c.limits;
        assert_count(
            l.max_connections,
            own.max_connections.or(top.max_connections),
            DEFAULT_MAX_CONNECTIONS,
        );
        assert_count(
            l.max_handshakes,
            own.max_handshakes.or(top.max_handshakes),
            DEFAULT_MAX_HANDSHAKES,
        );
        assert_count(
            l.max_handshakes_per_source,
            own.max_handshakes_per_source
                .or(top.max_handshakes_per_source),
            DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        );
        assert_count(
            l.max_unauthenticated_per_source,
            own.max_unauthenticated_per_source
                .or(top.max_unauthenticated_per_source),
            DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        );
        assert_duration(
            l.handshake_timeout,
            own.handshake_timeout.or(top.handshake_timeout),
            DEFAULT_HANDSHAKE_TIMEOUT,
        );
        assert_duration(
            l.connect_timeout,
            own.connect_timeout.or(top.connect_timeout),
            DEFAULT_CONNECT_TIMEOUT,
        );
        assert_optional_duration(l.keepalive, own.keepalive.or(top.keepalive));
        assert_optional_duration(l.idle_timeout, own.idle_timeout.or(top.idle_timeout));
    }
}

fn assert_count(got: usize, written: Option<usize>, default: usize) {
    assert!((1..=MAX_COUNT).contains(&got), "limit {got} out of range");
    assert_eq!(got, written.unwrap_or(default));
}

/// A duration that is off by default and when written 0.
fn assert_optional_duration(got: Option<Duration>, written: Option<f64>) {
    match (got, written) {
        (None, None) => {}
        (None, Some(s)) => assert!(s == 0.0, "{s} turned it off"),
        (Some(d), w) => assert_duration(d, w, Duration::ZERO),
    }
}

fn assert_duration(got: Duration, written: Option<f64>, default: Duration) {
    assert!(
        !got.is_zero() && got.as_secs_f64() <= MAX_SECONDS,
        "duration {got:?} (written {written:?}) out of range"
    );
    match written {
        None => assert_eq!(got, default),
        Some(s) => assert_eq!(got, Duration::from_secs_f64(s)),
    }
}

fn assert_endpoint(addr: &str, port_zero_ok: bool, unix_ok: bool) {
    if let Some(name) = addr.strip_prefix("systemd:") {
        assert!(port_zero_ok, "{addr:?}: socket activation is for listening");
        assert!(!name.is_empty() && name.len() <= 255 && !name.contains(':'));
        return;
    }
    match addr.strip_prefix("unix:") {
        Some(path) => {
            assert!(unix_ok, "{addr:?}: a Unix socket on the capnp-noise side");
            assert!(path.starts_with('/') && path.len() <= 107 && !path.contains('\0'));
        }
        None => assert_host_port(addr, port_zero_ok),
    }
}

fn assert_host_port(addr: &str, port_zero_ok: bool) {
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");
    assert!(!host.is_empty(), "{addr:?} has no host");
    assert!(
        !host.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{addr:?}: space in the host"
    );
    let port: u16 = port.parse().expect("a port number");
    assert!(port_zero_ok || port != 0, "{addr:?}: port 0 to connect to");
}

/// Seeds: the example of the module docs, the files of `tests/tunnel.rs`
/// and of the unit tests, and a few mistakes.
pub(super) fn seeds() -> Vec<Seed> {
    let (a, b) = (initiator_identity().vat_id(), responder_identity().vat_id());
    let mut v = Vec::new();
    let docs: String = include_str!("../../../capnp-noise-tunnel/src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect();
    let start = docs.find("```toml\n").expect("a TOML example") + 8;
    let len = docs[start..].find("```").expect("its end");
    let example = docs[start..start + len].replace("vat1...", &a.to_string());
    v.push(Seed::new(
        "tunnel_config",
        "module-docs",
        example.into_bytes(),
    ));

    let server = format!(
        "\nidentity = \"server.key\"\nmax_handshakes = 8\n\n[service.echo]\nmode = \"server\"\n\
         listen = \"127.0.0.1:0\"\nconnect = \"unix:/run/echo.sock\"\nallow = \"clients.allow\"\n\n\
         [service.upper]\nmode = \"server\"\nlisten = \"systemd:upper\"\nconnect = \"127.0.0.1:40002\"\n\
         allow_vat = [\"{a}\"]\nmax_connections = 4\nproxy_protocol = \"v2\"\n"
    );
    v.push(Seed::new(
        "tunnel_config",
        "two-servers",
        server.into_bytes(),
    ));
    let client = format!(
        "\nidentity = \"client.key\"\n\n[service.to-echo]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\n\
         connect = \"127.0.0.1:40003\"\npeer = [\"{b}\", \"{a}\"]\n\n[service.to-upper]\nmode = \"client\"\n\
         listen = \"unix:/run/capnp-noise/upper.sock\"\nlisten_mode = 0o660\nconnect = \"127.0.0.1:40004\"\nknown_vats = \"known_vats\"\n"
    );
    v.push(Seed::new(
        "tunnel_config",
        "two-clients",
        client.into_bytes(),
    ));
    let mixed = format!(
        "identity = \"keys/tunnel.key\"\nshutdown_grace = 2.5\nmax_connections = 10\nlog_format = \"json\"\nmetrics = \"127.0.0.1:9100\"\n\n\
         [service.web]\nmode = \"server\"\nlisten = \"[::]:8443\"\nconnect = \"127.0.0.1:8080\"\n\
         allow = \"web.allow\"\nallow_vat = [\"{b}\"]\nmax_connections = 3\nhandshake_timeout = 1\n\n\
         [service.db]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nconnect = \"db.example.com:5433\"\n\
         peer = \"{a}\"\nconnect_timeout = 0.25\nkeepalive = 25\nidle_timeout = 0\nsuite = \"chachapoly\"\nvia = \"http://10.0.0.1:3128\"\n"
    );
    v.push(Seed::new(
        "tunnel_config",
        "server-and-client",
        mixed.into_bytes(),
    ));
    let resuming = format!(
        "identity = \"t.key\"\n\n[service.web]\nmode = \"server\"\nlisten = \"[::]:8443\"\n\
         connect = \"127.0.0.1:8080\"\nallow_vat = [\"{b}\"]\nresumption = true\nearly_data = true\n\n\
         [service.db]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nconnect = \"db.example.com:5433\"\n\
         peer = \"{a}\"\nresumption = true\nearly_data = true\n"
    );
    v.push(Seed::new(
        "tunnel_config",
        "resumption",
        resuming.clone().into_bytes(),
    ));
    v.push(Seed::new(
        "tunnel_config",
        "early-data-without-resumption",
        resuming.replace("resumption = true\n", "").into_bytes(),
    ));
    v.push(Seed::new(
        "tunnel_config",
        "resumption-with-known-vats",
        resuming
            .replace(&format!("peer = \"{a}\""), "known_vats = \"known\"")
            .into_bytes(),
    ));
    v.push(Seed::new(
        "tunnel_config",
        "unknown-key",
        b"identity = \"k.key\"\n[service.s]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nconnect = \"h:1\"\npeer = \"vat1x\"\nretries = 3\n".to_vec(),
    ));
    let pem = initiator_identity().to_pkcs8_pem().to_string();
    let pasted = format!(
        "identity = \"k\"\n[service.s]\nmode = \"client\"\nlisten = \"127.0.0.1:1\"\n\
         connect = \"h:2\"\npeer = \"\"\"{pem}\"\"\"\n"
    );
    v.push(Seed::new(
        "tunnel_config",
        "key-as-peer",
        pasted.into_bytes(),
    ));
    v
}

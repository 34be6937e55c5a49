//! The contenders that comparisons run beside capnp-noise, started as child
//! processes: a pair of `capnp-noise tunnel` ends, and a pair of stunnel
//! (TLS 1.3) ends with self-signed certificates that each end pins.
//!
//! One launcher for [`wan::compare`](crate::wan::compare) (in network
//! namespaces) and `examples/tunnel_bench.rs` (on loopback): each makes
//! its own [`Command`] (a namespace's, or one under strace) and takes the
//! arguments and configuration files from here, so the contenders are
//! configured alike wherever they are compared.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Child processes, killed and reaped when dropped.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    /// Adds a started child.
    pub fn push(&mut self, child: Child) {
        self.0.push(child);
    }

    /// The process ids, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The arguments of `capnp-noise tunnel server`: listen for capnp-noise on
/// `listen`, forward to `connect`, prove the identity in `key`, allow the
/// client `allow_vat` only.
pub fn tunnel_server_args(
    listen: &str,
    connect: &str,
    key: &Path,
    allow_vat: &str,
) -> Vec<OsString> {
    tunnel_args("server", listen, connect, key, "--allow-vat", allow_vat)
}

/// The arguments of `capnp-noise tunnel client`: listen for plain TCP on
/// `listen`, carry it to the server at `connect`, prove the identity in
/// `key`, pin the server's VatId `peer`.
pub fn tunnel_client_args(listen: &str, connect: &str, key: &Path, peer: &str) -> Vec<OsString> {
    tunnel_args("client", listen, connect, key, "--peer", peer)
}

fn tunnel_args(
    side: &str,
    listen: &str,
    connect: &str,
    key: &Path,
    trust: &str,
    vat: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["tunnel", side, "--listen", listen, "--connect", connect]
        .map(OsString::from)
        .into();
    args.push("--identity".into());
    args.push(key.into());
    args.push(trust.into());
    args.push(vat.into());
    args
}

/// One end of a stunnel pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunnelEnd {
    /// Accepts TLS, connects in plain TCP.
    Server,
    /// Accepts plain TCP, connects in TLS (`client = yes`).
    Client,
}

impl StunnelEnd {
    fn name(self) -> &'static str {
        match self {
            StunnelEnd::Server => "server",
            StunnelEnd::Client => "client",
        }
    }

    fn peer(self) -> StunnelEnd {
        match self {
            StunnelEnd::Server => StunnelEnd::Client,
            StunnelEnd::Client => StunnelEnd::Server,
        }
    }
}

/// Makes the two ends' self-signed ECDSA P-256 certificates in `dir`
/// (`server.cert.pem`, `server.key.pem`, `client.*`), with `openssl`.
///
/// # Panics
/// When openssl is missing or fails.
pub fn stunnel_certificates(dir: &Path) {
    for end in [StunnelEnd::Server, StunnelEnd::Client] {
        let name = end.name();
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args([
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
            ])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key.pem")))
            .arg("-out")
            .arg(dir.join(format!("{name}.cert.pem")))
            .output()
            .unwrap_or_else(|e| panic!("run openssl (apt-get install openssl): {e}"));
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Writes the configuration of stunnel end `end` into `dir` (which holds
/// [`stunnel_certificates`]) and returns its path: TLS 1.3 at least, the
/// peer's certificate pinned (`verifyPeer`, `CAfile`), TCP_NODELAY on both
/// sockets (as the capnp-noise tunnel does), in the foreground; one
/// section per `(name, accept, connect)` of `services`.
///
/// # Panics
/// When the file cannot be written.
pub fn stunnel_config(dir: &Path, end: StunnelEnd, services: &[(&str, String, String)]) -> PathBuf {
    let (name, peer) = (end.name(), end.peer().name());
    let mut conf = format!(
        "foreground = yes\npid =\ndebug = 3\n\
         socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
         cert = {d}/{name}.cert.pem\nkey = {d}/{name}.key.pem\n\
         CAfile = {d}/{peer}.cert.pem\nverifyPeer = yes\n\
         sslVersionMin = TLSv1.3\n",
        d = dir.display()
    );
    for (service, accept, connect) in services {
        conf.push_str(&format!("[{service}]\n"));
        if end == StunnelEnd::Client {
            conf.push_str("client = yes\n");
        }
        conf.push_str(&format!("accept = {accept}\nconnect = {connect}\n"));
    }
    let path = dir.join(format!("stunnel-{name}.conf"));
    std::fs::write(&path, conf).expect("write the stunnel configuration");
    path
}

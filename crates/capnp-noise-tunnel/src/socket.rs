//! The plain side's sockets: TCP, or (on Unix) a Unix domain socket when
//! the address is `unix:/path`.
//!
//! A Unix listening socket is created with its mode already set: it is
//! bound under a temporary name in the same directory, given the
//! configured mode, then renamed into place, so that no other local user
//! can connect in between. A stale socket file left by a previous run is
//! replaced; a path where something listens, or that is not a socket, is
//! an error. The file is removed when the listener is dropped.
//!
//! `systemd:NAME` takes the listening socket systemd passed under that name
//! (socket activation: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), TCP or
//! Unix; systemd owns it, so its file is never removed here.

use std::fmt;
use std::io;
use std::net::SocketAddr;
#[cfg(unix)]
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};

/// The path of a `unix:/path` address, or `None` for `HOST:PORT`.
#[cfg(unix)]
pub(crate) fn unix_path(addr: &str) -> Option<&Path> {
    addr.strip_prefix("unix:").map(Path::new)
}

/// A bound address: what `listening` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bound {
    /// A TCP address (with the actual port when the configuration said 0).
    Tcp(SocketAddr),
    /// A Unix domain socket's path.
    #[cfg(unix)]
    Unix(PathBuf),
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Tcp(a) => a.fmt(f),
            #[cfg(unix)]
            Bound::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where an accepted connection comes from, for logs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Remote {
    Tcp(SocketAddr),
    #[cfg(unix)]
    Unix,
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Tcp(a) => a.fmt(f),
            #[cfg(unix)]
            Remote::Unix => f.write_str("unix"),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// The socket, its path, and whether this process created it (and
    /// removes it when dropped).
    #[cfg(unix)]
    Unix(UnixListener, PathBuf, bool),
}

/// The sockets systemd passed, and their names.
#[cfg(unix)]
struct Inherited {
    fds: listenfd::ListenFd,
    names: Vec<String>,
}

#[cfg(unix)]
static INHERITED: std::sync::OnceLock<std::sync::Mutex<Inherited>> = std::sync::OnceLock::new();

/// Takes the sockets systemd passed (socket activation) from the
/// environment, once per process; later calls do nothing. Call it before
/// starting threads: it removes `LISTEN_FDS` and `LISTEN_PID` from the
/// environment (so children do not inherit them).
#[cfg(unix)]
pub fn take_systemd_sockets() {
    INHERITED.get_or_init(|| {
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        std::sync::Mutex::new(Inherited {
            fds: listenfd::ListenFd::from_env(),
            names,
        })
    });
}

/// The listening socket systemd passed as `name`.
#[cfg(unix)]
fn inherited(name: &str) -> io::Result<Listener> {
    take_systemd_sockets();
    let mut inherited = INHERITED
        .get()
        .expect("initialized above")
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let missing = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "systemd passed no listening socket named {name:?} (names passed: {:?}; \
                 FileDescriptorName= in the .socket unit names them)",
                inherited.names
            ),
        )
    };
    let Some(at) = inherited.names.iter().position(|n| n == name) else {
        return Err(missing());
    };
    if at >= inherited.fds.len() {
        return Err(missing());
    }
    if let Ok(Some(tcp)) = inherited.fds.take_tcp_listener(at) {
        tcp.set_nonblocking(true)?;
        return TcpListener::from_std(tcp).map(Listener::Tcp);
    }
    match inherited.fds.take_unix_listener(at)? {
        Some(unix) => {
            unix.set_nonblocking(true)?;
            let path = unix
                .local_addr()?
                .as_pathname()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            UnixListener::from_std(unix).map(|l| Listener::Unix(l, path, false))
        }
        None => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("the socket named {name:?} was taken already"),
        )),
    }
}

impl Listener {
    /// Binds `addr` (`HOST:PORT` or `unix:/path`); a Unix socket gets `mode`.
    pub(crate) async fn bind(addr: &str, mode: u32) -> io::Result<Self> {
        #[cfg(unix)]
        if let Some(path) = unix_path(addr) {
            return bind_unix(path, mode).map(|l| Listener::Unix(l, path.to_path_buf(), true));
        }
        #[cfg(unix)]
        if let Some(name) = addr.strip_prefix("systemd:") {
            return inherited(name);
        }
        let _ = mode;
        TcpListener::bind(addr).await.map(Listener::Tcp)
    }

    pub(crate) fn bound(&self) -> io::Result<Bound> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Bound::Tcp),
            #[cfg(unix)]
            Listener::Unix(_, path, _) => Ok(Bound::Unix(path.clone())),
        }
    }

    pub(crate) async fn accept(&self) -> io::Result<(Plain, Remote)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                // As on dialed sockets: without it, a reply that leaves in
                // two frames waits for the peer's delayed ACK of the first
                // (Nagle), about one more round trip to a first answer
                // across a WAN (tests/wan.rs, the first answer).
                let _ = s.set_nodelay(true);
                Ok((Plain::Tcp(s), Remote::Tcp(a)))
            }
            #[cfg(unix)]
            Listener::Unix(l, _, _) => Ok((Plain::Unix(l.accept().await?.0), Remote::Unix)),
        }
    }
}

#[cfg(unix)]
impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, true) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a Unix socket at `path` with `mode` from the start (see the
/// module docs).
#[cfg(unix)]
fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.{}.{:x}",
        std::process::id(),
        rand_suffix()
    ));
    let listener = UnixListener::bind(&temp)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

/// A few bytes from the clock, so two binds of one process differ.
#[cfg(unix)]
fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A plain-side connection.
#[derive(Debug)]
pub(crate) enum Plain {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Plain {
    /// Connects to `addr` (`HOST:PORT` or `unix:/path`).
    pub(crate) async fn connect(addr: &str) -> io::Result<Self> {
        #[cfg(unix)]
        if let Some(path) = unix_path(addr) {
            return UnixStream::connect(path).await.map(Plain::Unix);
        }
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        Ok(Plain::Tcp(tcp))
    }

    /// Makes the coming close a reset, where the socket has one (TCP).
    pub(crate) fn reset_on_close(&self) {
        match self {
            Plain::Tcp(s) => {
                let _ = s.set_zero_linger();
            }
            #[cfg(unix)]
            Plain::Unix(_) => {}
        }
    }
}

/// An accepted plain-side connection on its way to a worker thread: a
/// `std` socket, no longer registered with the accepting runtime.
#[derive(Debug)]
pub(crate) enum Moving {
    Tcp(std::net::TcpStream),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
}

impl Plain {
    /// Unregisters the socket from this runtime, to move it to another.
    pub(crate) fn into_moving(self) -> io::Result<Moving> {
        Ok(match self {
            Plain::Tcp(s) => Moving::Tcp(s.into_std()?),
            #[cfg(unix)]
            Plain::Unix(s) => Moving::Unix(s.into_std()?),
        })
    }
}

impl Moving {
    /// Registers the socket with the runtime of the calling thread.
    pub(crate) fn arrive(self) -> io::Result<Plain> {
        Ok(match self {
            Moving::Tcp(s) => Plain::Tcp(TcpStream::from_std(s)?),
            #[cfg(unix)]
            Moving::Unix(s) => Plain::Unix(UnixStream::from_std(s)?),
        })
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Plain::Tcp($s) => $e,
            #[cfg(unix)]
            Plain::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_unix_socket_has_its_mode_replaces_a_stale_file_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = format!("unix:{}", path.display());
        // A stale socket (nobody listens) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let l = Listener::bind(&addr, 0o640).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(l.bound().unwrap(), Bound::Unix(path.clone()));
        // A live one is not.
        let e = Listener::bind(&addr, 0o600).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let only: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(only.len(), 1, "a temporary name was left behind");
        drop(l);
        assert!(!path.exists(), "the socket file outlived its listener");
        // Nor a file that is not a socket.
        std::fs::write(&path, b"data").unwrap();
        let e = Listener::bind(&addr, 0o600).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}

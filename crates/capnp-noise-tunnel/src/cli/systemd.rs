//! The service manager's notifications (`sd_notify`): `READY=1` once every
//! service listens, `STOPPING=1` when a shutdown begins, `WATCHDOG=1` at
//! half the interval systemd asks for (`WATCHDOG_USEC`). Without
//! `NOTIFY_SOCKET` (not started by systemd with `Type=notify`), nothing is
//! sent. Written from sd_notify(3): one datagram per message to the
//! `AF_UNIX` socket named by `NOTIFY_SOCKET` (a path, or `@` for Linux's
//! abstract namespace).

use std::time::Duration;

#[cfg(unix)]
use tracing::warn;

/// Sends `state` to the service manager, if there is one.
pub(crate) fn notify(state: &str) {
    #[cfg(unix)]
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = send(&socket, state) {
            warn!(error = %e, "cannot notify the service manager ({state})");
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

#[cfg(unix)]
fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let out = UnixDatagram::unbound()?;
    let name = socket.as_bytes();
    match name.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            out.send_to_addr(state.as_bytes(), &addr)?;
        }
        _ => {
            out.send_to(state.as_bytes(), std::path::Path::new(socket))?;
        }
    }
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if it is set
/// for this process (`WATCHDOG_PID` absent or ours).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse() != Ok(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `every`, for as long as the runtime runs.
pub(crate) async fn watchdog(every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        notify("WATCHDOG=1");
    }
}

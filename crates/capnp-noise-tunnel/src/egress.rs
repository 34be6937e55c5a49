//! Reaching the server through an office proxy (a client service's
//! `via`): HTTP CONNECT (RFC 9110, section 9.3.6) or SOCKS5 (RFC 1928),
//! without proxy authentication.
//!
//! The proxy only carries bytes: the server is still authenticated by the
//! Noise handshake, so a proxy that sends the connection elsewhere gets it
//! refused like any impostor. A proxy's refusal (an HTTP status other than
//! 2xx, a SOCKS5 error code) fails the connection with the proxy's answer
//! (its status line, at most 100 printable characters). The answer is read
//! byte by byte up to [`MAX_ANSWER`] bytes, so nothing after it is taken
//! from the stream.

use std::fmt;
use std::io;
use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest HTTP answer header read from a proxy.
pub const MAX_ANSWER: usize = 8 * 1024;

/// A proxy to reach the server through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `http://HOST:PORT`: an HTTP proxy, by CONNECT.
    Http(String),
    /// `socks5://HOST:PORT`: a SOCKS5 proxy (the server's name is resolved
    /// by the proxy).
    Socks5(String),
}

impl Via {
    /// Parses `http://HOST:PORT` or `socks5://HOST:PORT` (a trailing `/` is
    /// allowed); the `HOST:PORT` part is returned unchecked.
    ///
    /// # Errors
    /// A fixed phrase for another scheme or a path.
    pub fn parse(text: &str) -> Result<Via, &'static str> {
        let (make, rest): (fn(String) -> Via, &str) = if let Some(r) = text.strip_prefix("http://")
        {
            (Via::Http, r)
        } else if let Some(r) = text.strip_prefix("socks5://") {
            (Via::Socks5, r)
        } else {
            return Err("write http://HOST:PORT or socks5://HOST:PORT");
        };
        let addr = rest.strip_suffix('/').unwrap_or(rest);
        if addr.contains(['/', '@', '?', '#']) {
            return Err("write the proxy as SCHEME://HOST:PORT, without user, path or query");
        }
        Ok(make(addr.to_string()))
    }

    /// The proxy's `HOST:PORT`.
    pub fn proxy(&self) -> &str {
        match self {
            Via::Http(a) | Via::Socks5(a) => a,
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Http(a) => write!(f, "http://{a}"),
            Via::Socks5(a) => write!(f, "socks5://{a}"),
        }
    }
}

/// Opens a connection to `target` (`HOST:PORT`) through `via`.
pub(crate) async fn connect(via: &Via, target: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(via.proxy()).await?;
    let _ = s.set_nodelay(true);
    match via {
        Via::Http(proxy) => http_connect(&mut s, proxy, target).await?,
        Via::Socks5(proxy) => socks5_connect(&mut s, proxy, target).await?,
    }
    Ok(s)
}

fn refused(proxy: &str, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("the proxy {proxy} {what}"),
    )
}

async fn http_connect<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    proxy: &str,
    target: &str,
) -> io::Result<()> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER {
            return Err(refused(proxy, "sent an answer header larger than 8 KiB"));
        }
        let byte = s.read_u8().await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                refused(proxy, "closed the connection without answering CONNECT")
            } else {
                e
            }
        })?;
        head.push(byte);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    if line.starts_with(b"HTTP/1.") && status.len() == 3 && status[0] == b'2' {
        return Ok(());
    }
    let shown: String = String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Err(refused(proxy, format_args!("answered {shown:?}")))
}

async fn socks5_connect<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    proxy: &str,
    target: &str,
) -> io::Result<()> {
    let (host, port) = target
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not HOST:PORT"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    // Greeting: version 5, one method, "no authentication".
    s.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice != [5, 0] {
        return Err(refused(proxy, "wants an authentication this tunnel lacks"));
    }
    let mut request = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        Ok(IpAddr::V6(ip)) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            let name = u8::try_from(host.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "host name too long"))?;
            request.push(3);
            request.push(name);
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await?;
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply).await?;
    if reply[0] != 5 {
        return Err(refused(proxy, "does not speak SOCKS5"));
    }
    if reply[1] != 0 {
        let why = match reply[1] {
            1 => "general failure",
            2 => "not allowed by its rules",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "an unknown error",
        };
        return Err(refused(
            proxy,
            format_args!("answered {} ({why})", reply[1]),
        ));
    }
    // The bound address, which nobody needs.
    let skip = match reply[3] {
        1 => 4,
        4 => 16,
        3 => usize::from(s.read_u8().await?),
        _ => return Err(refused(proxy, "sent an unknown address type")),
    };
    let mut rest = vec![0u8; skip + 2];
    s.read_exact(&mut rest).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[test]
    fn proxies_are_written_as_urls() {
        assert_eq!(
            Via::parse("http://10.0.0.1:3128"),
            Ok(Via::Http("10.0.0.1:3128".into()))
        );
        assert_eq!(
            Via::parse("socks5://proxy:1080/"),
            Ok(Via::Socks5("proxy:1080".into()))
        );
        assert!(Via::parse("https://p:1").is_err());
        assert!(Via::parse("http://user:pw@p:1").is_err());
        assert_eq!(Via::Socks5("p:1".into()).to_string(), "socks5://p:1");
    }

    #[tokio::test]
    async fn http_connect_takes_a_2xx_and_nothing_more() {
        let (mut us, mut proxy) = duplex(4096);
        let talk = tokio::spawn(async move {
            let mut req = vec![0u8; 64];
            let n = proxy.read(&mut req).await.unwrap();
            assert_eq!(&req[..n], b"CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\n\r\n");
            proxy
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\nNOISE")
                .await
                .unwrap();
            proxy
        });
        http_connect(&mut us, "p:8", "h:1").await.unwrap();
        let mut after = [0u8; 5];
        us.read_exact(&mut after).await.unwrap();
        assert_eq!(
            &after, b"NOISE",
            "bytes after the answer stay in the stream"
        );
        drop(talk.await.unwrap());

        let (mut us, mut proxy) = duplex(4096);
        tokio::spawn(async move {
            let mut req = vec![0u8; 64];
            let _ = proxy.read(&mut req).await;
            let _ = proxy
                .write_all(b"HTTP/1.1 403 Access violation\x1b[31m\r\nServer: x\r\n\r\n")
                .await;
        });
        let e = http_connect(&mut us, "p:8", "h:1").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            e.to_string(),
            "the proxy p:8 answered \"HTTP/1.1 403 Access violation[31m\""
        );
    }

    #[tokio::test]
    async fn socks5_asks_for_the_name_and_reads_the_whole_reply() {
        let (mut us, mut proxy) = duplex(4096);
        let talk = tokio::spawn(async move {
            let mut hello = [0u8; 3];
            proxy.read_exact(&mut hello).await.unwrap();
            assert_eq!(hello, [5, 1, 0]);
            proxy.write_all(&[5, 0]).await.unwrap();
            let mut req = [0u8; 4 + 1 + 11 + 2];
            proxy.read_exact(&mut req).await.unwrap();
            assert_eq!(&req[..5], &[5, 1, 0, 3, 11]);
            assert_eq!(&req[5..16], b"example.com");
            assert_eq!(&req[16..], &4443u16.to_be_bytes());
            proxy
                .write_all(&[5, 0, 0, 1, 10, 0, 0, 1, 0x11, 0x5c, b'N'])
                .await
                .unwrap();
            proxy
        });
        socks5_connect(&mut us, "p:1080", "example.com:4443")
            .await
            .unwrap();
        assert_eq!(us.read_u8().await.unwrap(), b'N');
        drop(talk.await.unwrap());

        let (mut us, mut proxy) = duplex(4096);
        tokio::spawn(async move {
            let mut hello = [0u8; 3];
            let _ = proxy.read_exact(&mut hello).await;
            let _ = proxy.write_all(&[5, 0]).await;
            let mut req = [0u8; 10];
            let _ = proxy.read_exact(&mut req).await;
            let _ = proxy.write_all(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        });
        let e = socks5_connect(&mut us, "p:1080", "192.0.2.1:80")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not allowed by its rules"), "{e}");
    }
}

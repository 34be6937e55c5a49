//! The PROXY protocol header a server service can send its target first,
//! so the backend learns who is calling: the client tunnel's address and,
//! in version 2, its authenticated VatId.
//!
//! Written from the HAProxy specification ("The PROXY protocol", versions 1
//! and 2): version 1 is one text line
//! (`PROXY TCP4 SRC DST SPORT DPORT\r\n`); version 2 is binary: the 12-byte
//! signature, `0x21` (version 2, PROXY), the family (`0x11` TCP over IPv4,
//! `0x21` TCP over IPv6), the length of what follows, the addresses and
//! ports, then TLVs. The VatId goes in a TLV of type [`VAT_ID_TLV`] (0xE0,
//! the first of the range the specification reserves for applications),
//! as its text form (`vat1...`, ASCII).
//!
//! The source is the client tunnel's address as this server sees it; the
//! destination is the server service's own address the client connected
//! to. When one is IPv4 and the other IPv6 (a server listening on `[::]`),
//! the IPv4 one is written IPv4-mapped; IPv4-mapped IPv6 addresses on both
//! sides are written as IPv4.

use std::net::{IpAddr, SocketAddr};

use capnp_noise::vat_id::VatId;

/// The TLV type of the VatId in a version 2 header.
pub const VAT_ID_TLV: u8 = 0xE0;

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Which PROXY protocol header a server service sends its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyProtocol {
    /// Version 1: a text line with the addresses only.
    V1,
    /// Version 2: binary, with the VatId in TLV 0xE0.
    V2,
}

impl ProxyProtocol {
    /// `"v1"` or `"v2"`, as the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }

    /// The header for a connection from `source` to `destination` by the
    /// vat `vat_id` (version 2 only carries it).
    pub fn header(self, source: SocketAddr, destination: SocketAddr, vat_id: &VatId) -> Vec<u8> {
        let (src, dst) = same_family(source, destination);
        match self {
            ProxyProtocol::V1 => {
                let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    src.ip(),
                    dst.ip(),
                    src.port(),
                    dst.port()
                )
                .into_bytes()
            }
            ProxyProtocol::V2 => {
                let vat = vat_id.to_string();
                let mut h = Vec::with_capacity(16 + 36 + 3 + vat.len());
                h.extend_from_slice(V2_SIGNATURE);
                h.push(0x21);
                let mut body = Vec::with_capacity(36 + 3 + vat.len());
                match (src.ip(), dst.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        h.push(0x11);
                        body.extend_from_slice(&s.octets());
                        body.extend_from_slice(&d.octets());
                    }
                    (s, d) => {
                        h.push(0x21);
                        body.extend_from_slice(&v6(s).octets());
                        body.extend_from_slice(&v6(d).octets());
                    }
                }
                body.extend_from_slice(&src.port().to_be_bytes());
                body.extend_from_slice(&dst.port().to_be_bytes());
                body.push(VAT_ID_TLV);
                let len = u16::try_from(vat.len()).expect("a VatId's text is short");
                body.extend_from_slice(&len.to_be_bytes());
                body.extend_from_slice(vat.as_bytes());
                let len = u16::try_from(body.len()).expect("a short header");
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&body);
                h
            }
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both addresses of one family: IPv4 when both can be, else IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmapped = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    };
    let (a, b) = (unmapped(a), unmapped(b));
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        let mapped = |s: SocketAddr| SocketAddr::new(IpAddr::V6(v6(s.ip())), s.port());
        (mapped(a), mapped(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_noise::Identity;

    fn vat() -> VatId {
        Identity::from_seed(&[7; 32]).vat_id()
    }

    #[test]
    fn version_1_is_one_line_of_addresses() {
        let h = ProxyProtocol::V1.header(
            "192.0.2.1:56324".parse().unwrap(),
            "198.51.100.11:443".parse().unwrap(),
            &vat(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.11 56324 443\r\n");
        let h = ProxyProtocol::V1.header(
            "[2001:db8::1]:1000".parse().unwrap(),
            "192.0.2.2:443".parse().unwrap(),
            &vat(),
        );
        assert_eq!(
            h,
            b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.2 1000 443\r\n".to_vec()
        );
    }

    #[test]
    fn version_2_carries_the_vat_id_in_tlv_0xe0() {
        let vat = vat();
        let text = vat.to_string();
        let h = ProxyProtocol::V2.header(
            "192.0.2.1:56324".parse().unwrap(),
            "[::ffff:198.51.100.11]:443".parse().unwrap(),
            &vat,
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        want.extend_from_slice(&(12 + 3 + text.len() as u16).to_be_bytes());
        want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 11]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        want.push(0xE0);
        want.extend_from_slice(&(text.len() as u16).to_be_bytes());
        want.extend_from_slice(text.as_bytes());
        assert_eq!(h, want);

        let h = ProxyProtocol::V2.header(
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
            &vat,
        );
        assert_eq!(h[13], 0x21, "TCP over IPv6");
        assert_eq!(
            u16::from_be_bytes([h[14], h[15]]) as usize,
            36 + 3 + text.len()
        );
        assert_eq!(
            &h[16..32],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h[h.len() - text.len()..], text.as_bytes());
    }
}

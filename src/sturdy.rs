//! Sturdy refs: persistent, shareable names for capabilities.
//!
//! A [`SturdyRef`] says *who* hosts an object (a [`VatId`]), *where* to
//! reach that vat (one or more addresses), and *which* object (a secret,
//! unguessable [`ObjectId`]). Knowing a sturdy ref is authority over the
//! object: treat its text like a password.
//!
//! # The URI form
//!
//! ```text
//! sturdy-ref = "capnp-noise://" vat-id "@" address *( "," address ) "/" object-id
//! vat-id     = "vat1" 55( %x61-7A / %x32-37 )   ; the VatId text form (SPEC.md), 59 characters
//! address    = host ":" port
//! host       = "[" IPv6address "]"                ; RFC 4291 text, no zone id
//!            / IPv4address                        ; dotted decimal, no leading zeros
//!            / reg-name                           ; DNS name: 1*( ALPHA / DIGIT / "-" / "_" / "." )
//! port       = "1"-"9" *4DIGIT                    ; 1-65535, no leading zeros
//! object-id  = 26*103( %x61-7A / %x32-37 )        ; base32 (RFC 4648 alphabet, lower case,
//!                                                 ; no padding, canonical) of 16-64 bytes
//! ```
//!
//! For example (object id of 32 bytes, the size [`ObjectId::random`] makes):
//!
//! ```text
//! capnp-noise://vat1r3k...7q@files.example.com:4000,[2001:db8::1]:4000/gq5c...x4a
//! ```
//!
//! Rules beyond the grammar:
//!
//! * The URI is compared and parsed case-sensitively: the scheme, VatId and
//!   object id are lower case. Host names are lower-cased when parsed
//!   (DNS is case-insensitive), so formatting a parsed URI gives its
//!   canonical form; IPv6 addresses are formatted per RFC 5952.
//! * A host made only of digits and dots must be a valid IPv4 address; a host
//!   containing `:` must be a bracketed IPv6 address.
//! * At most [`MAX_ADDRESSES`] addresses, at least one; at most
//!   [`MAX_URI_LEN`] characters in all. No user info besides the VatId, no
//!   path beyond the object id, no query, no fragment, no whitespace.
//! * Addresses are hints tried in order; the connection is only accepted if
//!   the peer proves the VatId, wherever it was reached.
//!
//! Compare OCaml capnp-rpc's `capnp://sha-256:<fingerprint>@host:port/<service-id>`:
//! we name the vat by its key itself (the VatId), not a hash of a TLS
//! certificate, and allow several addresses.
//!
//! # The Cap'n Proto form
//!
//! `SturdyRef` in `schema/noise.capnp` carries the same three parts:
//! `vatId`, `addresses` (each in the `address` form above) and `objectId`
//! (raw bytes). See [`SturdyRef::write_to`] and [`SturdyRef::read_from`].
//!
//! # Serving sturdy refs
//!
//! A [`Restorer`] maps secret object ids to whatever the server hands out
//! (capabilities). It stores only SHA-256 digests of the ids and looks them
//! up by digest, so neither timing nor a memory dump reveals which ids
//! exist.
//!
//! ```
//! use capnp_noise::sturdy::{Address, Restorer, SturdyRef};
//! use capnp_noise::Identity;
//! # fn main() -> capnp_noise::Result<()> {
//! let server = Identity::generate();
//! let mut restorer = Restorer::new();
//! let id = restorer.add("the file service");
//!
//! let sr = SturdyRef::new(server.vat_id(), vec!["localhost:4000".parse()?], id.clone())?;
//! let uri = sr.to_string();
//! let parsed: SturdyRef = uri.parse()?;
//! assert_eq!(parsed, sr);
//! assert_eq!(restorer.restore(parsed.object_id().as_bytes())?, &"the file service");
//!
//! restorer.revoke(&id);
//! assert!(restorer.restore(parsed.object_id().as_bytes()).is_err());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::schema::noise_capnp::sturdy_ref;
use crate::vat_id::{shorten, VatId};

/// The URI scheme, with its `://`.
pub const SCHEME: &str = "capnp-noise://";
/// The fewest bytes in an object id (128 bits).
pub const MIN_OBJECT_ID_LEN: usize = 16;
/// The most bytes in an object id.
pub const MAX_OBJECT_ID_LEN: usize = 64;
/// The size of the object ids [`ObjectId::random`] makes (256 bits).
pub const RANDOM_OBJECT_ID_LEN: usize = 32;
/// The most addresses in one sturdy ref.
pub const MAX_ADDRESSES: usize = 16;
/// The longest sturdy-ref URI accepted.
pub const MAX_URI_LEN: usize = 8192;
/// The longest host name (RFC 1035).
pub const MAX_HOST_LEN: usize = 253;

const RESTORER_DOMAIN: &[u8] = b"capnp-noise restorer object-id:";

/// The secret that names an object in a sturdy ref: 16 to 64 bytes.
///
/// Equality is constant-time; `Debug` shows only the length; the bytes are
/// zeroized on drop.
#[derive(Clone)]
pub struct ObjectId(Zeroizing<Vec<u8>>);

impl ObjectId {
    /// A new random object id of [`RANDOM_OBJECT_ID_LEN`] bytes from the OS RNG.
    pub fn random() -> Self {
        let mut v = Zeroizing::new(vec![0u8; RANDOM_OBJECT_ID_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut v);
        ObjectId(v)
    }

    /// An object id with the given bytes.
    ///
    /// # Errors
    /// [`Error::Key`] if there are fewer than [`MIN_OBJECT_ID_LEN`] or more
    /// than [`MAX_OBJECT_ID_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if !(MIN_OBJECT_ID_LEN..=MAX_OBJECT_ID_LEN).contains(&bytes.len()) {
            return Err(Error::Key(format!(
                "an object id has {MIN_OBJECT_ID_LEN} to {MAX_OBJECT_ID_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        Ok(ObjectId(Zeroizing::new(bytes.to_vec())))
    }

    /// The secret bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The text form used in URIs: lower-case base32 without padding.
    /// It is the secret itself; do not log it.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .encode(&self.0)
                .to_ascii_lowercase(),
        )
    }

    /// Parses the text form.
    ///
    /// # Errors
    /// [`Error::Key`] naming the problem (but never echoing the secret): a
    /// character outside `a-z2-7`, a length that is no whole number of
    /// bytes, non-canonical trailing bits, or a wrong number of bytes.
    pub fn from_text(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Key(format!("invalid object id: {why}"));
        if s.is_empty() {
            return Err(bad("it is empty".into()));
        }
        let max_text = (MAX_OBJECT_ID_LEN * 8).div_ceil(5);
        if s.len() > max_text {
            return Err(bad(format!(
                "it has {} characters; the most is {max_text}",
                s.len()
            )));
        }
        if let Some((i, c)) = s
            .char_indices()
            .find(|(_, c)| !matches!(c, 'a'..='z' | '2'..='7'))
        {
            return Err(bad(format!(
                "character {c:?} at position {} is not one of a-z, 2-7",
                i + 1
            )));
        }
        let upper = Zeroizing::new(s.to_ascii_uppercase());
        let bytes = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .decode(upper.as_bytes())
                .map_err(|_| {
                    bad(
                        "it is not canonical base32 (a truncated copy, or a typo at the end)"
                            .into(),
                    )
                })?,
        );
        ObjectId::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
    }
}

impl PartialEq for ObjectId {
    fn eq(&self, other: &Self) -> bool {
        // The lengths are not secret; the bytes are compared without early exit.
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for ObjectId {}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId(<secret, {} bytes>)", self.0.len())
    }
}

/// Where a vat may be reached: a host and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    host: Host,
    port: u16,
}

/// The host part of an [`Address`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower case.
    Domain(String),
    /// An IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address (written in brackets).
    Ipv6(Ipv6Addr),
}

impl Host {
    /// Parses a host: a bracketed IPv6 address, a dotted-decimal IPv4
    /// address, or a DNS name (lower-cased).
    ///
    /// # Errors
    /// [`Error::Key`] naming the problem.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Key(format!("invalid host {:?}: {why}", shorten(s)));
        if let Some(inner) = s.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return Err(bad("an IPv6 address needs a closing ']'".into()));
            };
            if inner.contains('%') {
                return Err(bad("IPv6 zone ids (%...) are not supported".into()));
            }
            return inner
                .parse::<Ipv6Addr>()
                .map(Host::Ipv6)
                .map_err(|_| bad("not a valid IPv6 address".into()));
        }
        if s.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if s.contains(':') {
            return Err(bad("an IPv6 address must be in brackets, as [::1]".into()));
        }
        if s.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return s
                .parse::<Ipv4Addr>()
                .map(Host::Ipv4)
                .map_err(|_| bad("not a valid IPv4 address".into()));
        }
        if s.len() > MAX_HOST_LEN {
            return Err(bad(format!("longer than {MAX_HOST_LEN} characters")));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(bad(format!(
                "character {c:?} is not allowed in a host name (letters, digits, '-', '_', '.')"
            )));
        }
        let labels = s.strip_suffix('.').unwrap_or(s);
        if labels.split('.').any(str::is_empty) {
            return Err(bad("a host name cannot have an empty label (\"..\")".into()));
        }
        Ok(Host::Domain(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ipv4(a) => write!(f, "{a}"),
            Host::Ipv6(a) => write!(f, "[{a}]"),
        }
    }
}

impl Address {
    /// An address from a host and a port. A [`Host::Domain`] is checked and
    /// lower-cased as [`Host::parse`] does, so every `Address` is canonical.
    ///
    /// # Errors
    /// [`Error::Key`] if `port` is 0 or the domain is not a valid host name.
    pub fn new(host: Host, port: u16) -> Result<Self> {
        if port == 0 {
            return Err(Error::Key("port 0 cannot be dialed".into()));
        }
        let host = match host {
            Host::Domain(d) => match Host::parse(&d)? {
                Host::Domain(d) => Host::Domain(d),
                _ => {
                    return Err(Error::Key(format!(
                        "{d:?} is an IP address, not a domain name"
                    )))
                }
            },
            ip => ip,
        };
        Ok(Address { host, port })
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl TryFrom<SocketAddr> for Address {
    type Error = Error;

    /// The IP address and port of a socket address, for example a
    /// listener's `local_addr()` (an IPv6 scope id is dropped: addresses
    /// carry none).
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use capnp_noise::sturdy::Address;
    ///
    /// let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    /// let address = Address::try_from(local).unwrap();
    /// assert_eq!(address.to_string(), "127.0.0.1:4000");
    /// ```
    ///
    /// # Errors
    /// [`Error::Key`] if the port is 0 (an unbound listener's), which
    /// cannot be dialed: every `Address` can.
    fn try_from(addr: SocketAddr) -> Result<Self> {
        let host = match addr.ip() {
            IpAddr::V4(ip) => Host::Ipv4(ip),
            IpAddr::V6(ip) => Host::Ipv6(ip),
        };
        Address::new(host, addr.port())
    }
}

impl fmt::Display for Address {
    /// `host:port`, with IPv6 hosts in brackets: a form that
    /// `std::net::ToSocketAddrs` and `tokio::net::TcpStream::connect` accept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for Address {
    type Err = Error;

    /// Parses `host:port` (IPv6 hosts in brackets).
    ///
    /// # Errors
    /// [`Error::Key`] naming the problem: no port, a bad port, or a bad host.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Key(format!("invalid address {:?}: {why}", shorten(s)));
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(bad("it needs a port, as host:port"));
        };
        if host.starts_with('[') != host.ends_with(']')
            || (host.contains(':') && !host.starts_with('['))
        {
            return Err(bad("an IPv6 address must be in brackets, as [::1]:4000"));
        }
        let port_ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && !port.starts_with('0');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|_| port_ok)
            .ok_or_else(|| {
                bad("the port must be a number from 1 to 65535 without leading zeros")
            })?;
        Address::new(Host::parse(host)?, port)
    }
}

/// A persistent reference to an object hosted by a vat; see the [module
/// docs](self) for its URI form. `Display` writes the URI (including the
/// secret object id); `Debug` hides the object id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SturdyRef {
    vat_id: VatId,
    addresses: Vec<Address>,
    object_id: ObjectId,
}

impl SturdyRef {
    /// A sturdy ref to `object_id` on vat `vat_id`, reachable at `addresses`
    /// (tried in order).
    ///
    /// # Errors
    /// [`Error::Key`] if there are no addresses or more than [`MAX_ADDRESSES`].
    pub fn new(vat_id: VatId, addresses: Vec<Address>, object_id: ObjectId) -> Result<Self> {
        if addresses.is_empty() {
            return Err(Error::Key(
                "invalid sturdy ref: it needs at least one address".into(),
            ));
        }
        if addresses.len() > MAX_ADDRESSES {
            return Err(Error::Key(format!(
                "invalid sturdy ref: {} addresses; the most is {MAX_ADDRESSES}",
                addresses.len()
            )));
        }
        Ok(SturdyRef {
            vat_id,
            addresses,
            object_id,
        })
    }

    /// The vat that hosts the object.
    pub fn vat_id(&self) -> &VatId {
        &self.vat_id
    }

    /// Where to reach the vat, in order of preference.
    pub fn addresses(&self) -> &[Address] {
        &self.addresses
    }

    /// The secret object id.
    pub fn object_id(&self) -> &ObjectId {
        &self.object_id
    }

    /// Fills a `SturdyRef` struct of `schema/noise.capnp`.
    pub fn write_to(&self, mut builder: sturdy_ref::Builder<'_>) {
        builder
            .reborrow()
            .init_vat_id()
            .set_ed25519(self.vat_id.as_bytes());
        write_addresses(
            builder
                .reborrow()
                .init_addresses(self.addresses.len() as u32),
            &self.addresses,
        );
        builder.set_object_id(self.object_id.as_bytes());
    }

    /// Reads a `SturdyRef` struct of `schema/noise.capnp`.
    ///
    /// # Errors
    /// [`Error::Key`] naming the field that is missing or malformed.
    pub fn read_from(reader: sturdy_ref::Reader<'_>) -> Result<Self> {
        let bad = |why: String| Error::Key(format!("invalid SturdyRef struct: {why}"));
        if !reader.has_vat_id() {
            return Err(bad("vatId is missing".into()));
        }
        let vat_id = VatId::read_capnp(reader.get_vat_id()).map_err(bad)?;
        let addresses = read_addresses(reader.get_addresses()).map_err(bad)?;
        let oid = reader
            .get_object_id()
            .map_err(|e| bad(format!("bad objectId: {e}")))?;
        let object_id = ObjectId::from_bytes(oid).map_err(|e| bad(e.to_string()))?;
        SturdyRef::new(vat_id, addresses, object_id)
    }
}

/// Fills a `List(Text)` of `host:port` addresses (already sized to `addresses`).
pub(crate) fn write_addresses(mut list: capnp::text_list::Builder<'_>, addresses: &[Address]) {
    for (i, a) in addresses.iter().enumerate() {
        list.set(i as u32, a.to_string());
    }
}

/// Reads a `List(Text)` of `host:port` addresses, at most [`MAX_ADDRESSES`].
///
/// # Errors
/// A description of the problem for the caller to wrap in its own error.
pub(crate) fn read_addresses(
    list: capnp::Result<capnp::text_list::Reader<'_>>,
) -> std::result::Result<Vec<Address>, String> {
    let list = list.map_err(|e| format!("bad addresses: {e}"))?;
    if list.len() as usize > MAX_ADDRESSES {
        return Err(format!(
            "{} addresses; the most is {MAX_ADDRESSES}",
            list.len()
        ));
    }
    list.iter()
        .map(|t| {
            let t = t.map_err(|e| format!("bad address: {e}"))?;
            let s = t
                .to_str()
                .map_err(|_| "an address is not UTF-8".to_string())?;
            s.parse::<Address>().map_err(|e| e.to_string())
        })
        .collect()
}

impl fmt::Display for SturdyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@", self.vat_id)?;
        for (i, a) in self.addresses.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        write!(f, "/{}", self.object_id.to_text().as_str())
    }
}

impl FromStr for SturdyRef {
    type Err = Error;

    /// Parses the URI form.
    ///
    /// # Errors
    /// [`Error::Key`] naming the malformed part; the message never repeats
    /// the object id.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Key(format!("invalid sturdy ref: {why}"));
        if s.len() > MAX_URI_LEN {
            return Err(bad(format!("longer than {MAX_URI_LEN} characters")));
        }
        if let Some((i, c)) = s
            .char_indices()
            .find(|(_, c)| c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!(
                "it contains {c:?} at position {} (a line break from copying?)",
                i + 1
            )));
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(bad(format!("it must start with {SCHEME:?}")));
        };
        let Some((vat, rest)) = rest.split_once('@') else {
            return Err(bad(format!(
                "expected \"{SCHEME}VATID@HOST:PORT/OBJECT-ID\"; the '@' after the VatId is missing"
            )));
        };
        let vat_id = vat.parse::<VatId>().map_err(|e| bad(e.to_string()))?;
        let Some((addrs, object)) = rest.split_once('/') else {
            return Err(bad(
                "the '/' and object id after the address are missing".into()
            ));
        };
        if addrs.is_empty() {
            return Err(bad("it needs at least one address after the '@'".into()));
        }
        let addresses = addrs
            .split(',')
            .take(MAX_ADDRESSES + 1)
            .map(|a| a.parse::<Address>().map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        if object.contains(['?', '#']) {
            return Err(bad("a query ('?') or fragment ('#') is not allowed".into()));
        }
        if object.contains('/') {
            return Err(bad(
                "only one path segment, the object id, is allowed".into()
            ));
        }
        let object_id = ObjectId::from_text(object).map_err(|e| bad(e.to_string()))?;
        SturdyRef::new(vat_id, addresses, object_id)
    }
}

/// The secret-to-object map behind sturdy refs, on the hosting vat.
///
/// Only a SHA-256 digest of each id is kept, and lookups go through the
/// digest: the time a lookup takes, and the order in which entries are
/// compared, depend on digests an attacker cannot steer toward a real id,
/// so a wrong guess reveals nothing about the ids that exist. A wrong and a
/// revoked id get the same error.
///
/// `Restorer` is a plain map (`&mut self` to change it); share it behind a
/// `RefCell` or `Mutex` as the RPC glue requires.
pub struct Restorer<T> {
    objects: HashMap<[u8; 32], T>,
}

impl<T> Default for Restorer<T> {
    fn default() -> Self {
        Restorer {
            objects: HashMap::new(),
        }
    }
}

impl<T> fmt::Debug for Restorer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Restorer")
            .field("objects", &self.objects.len())
            .finish()
    }
}

impl<T> Restorer<T> {
    /// An empty restorer.
    pub fn new() -> Self {
        Self::default()
    }

    fn digest(object_id: &[u8]) -> [u8; 32] {
        Sha256::new()
            .chain_update(RESTORER_DOMAIN)
            .chain_update(object_id)
            .finalize()
            .into()
    }

    /// Registers `value` under a new random object id, and returns the id.
    pub fn add(&mut self, value: T) -> ObjectId {
        loop {
            let id = ObjectId::random();
            let key = Self::digest(id.as_bytes());
            if let std::collections::hash_map::Entry::Vacant(e) = self.objects.entry(key) {
                e.insert(value);
                return id;
            }
        }
    }

    /// Registers `value` under a chosen id, returning the value it replaces.
    pub fn insert(&mut self, id: &ObjectId, value: T) -> Option<T> {
        self.objects.insert(Self::digest(id.as_bytes()), value)
    }

    /// Revokes `id`: later lookups fail. Returns the value it named.
    pub fn revoke(&mut self, id: &ObjectId) -> Option<T> {
        self.objects.remove(&Self::digest(id.as_bytes()))
    }

    /// The value registered under `id`.
    pub fn get(&self, id: &ObjectId) -> Option<&T> {
        self.objects.get(&Self::digest(id.as_bytes()))
    }

    /// Looks up the object id bytes a client presented (of any length).
    ///
    /// # Errors
    /// [`Error::UnknownObject`], the same for an id that never existed, one
    /// that was revoked, and one of the wrong size.
    pub fn restore(&self, object_id: &[u8]) -> Result<&T> {
        self.objects
            .get(&Self::digest(object_id))
            .ok_or(Error::UnknownObject)
    }

    /// How many objects are registered.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// True if no object is registered.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use proptest::prelude::*;

    #[test]
    fn a_socket_address_is_an_address_unless_its_port_is_zero() {
        for text in ["127.0.0.1:4000", "[2001:db8::1]:65535", "[::1]:1"] {
            let socket: SocketAddr = text.parse().unwrap();
            let address = Address::try_from(socket).unwrap();
            assert_eq!(address.to_string(), text);
            assert_eq!(text.parse::<Address>().unwrap(), address);
        }
        let scoped: SocketAddr = "[fe80::1%7]:4000".parse().unwrap();
        assert_eq!(
            Address::try_from(scoped).unwrap().to_string(),
            "[fe80::1]:4000"
        );
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(matches!(Address::try_from(unbound), Err(Error::Key(_))));
    }

    fn vat() -> VatId {
        Identity::from_seed(&[4; 32]).vat_id()
    }

    fn sample() -> SturdyRef {
        SturdyRef::new(
            vat(),
            vec![
                "Example.COM:4000".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
                "10.0.0.1:1".parse().unwrap(),
            ],
            ObjectId::from_bytes(&[0xab; 16]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn uri_has_the_documented_form() {
        let sr = sample();
        let uri = sr.to_string();
        let expected = format!(
            "capnp-noise://{}@example.com:4000,[2001:db8::1]:443,10.0.0.1:1/{}",
            vat(),
            data_encoding::BASE32_NOPAD
                .encode(&[0xab; 16])
                .to_ascii_lowercase()
        );
        assert_eq!(uri, expected);
        assert_eq!(uri.parse::<SturdyRef>().unwrap(), sr);
        let dbg = format!("{sr:?}");
        assert!(!dbg.contains(sr.object_id().to_text().as_str()), "{dbg}");
        assert!(dbg.contains("secret, 16 bytes"));
    }

    #[test]
    fn malformed_uris_name_the_part() {
        let good = sample().to_string();
        let v = vat().to_string();
        let oid = sample().object_id().to_text().to_string();
        let cases: Vec<(String, &str)> = vec![
            (
                good.replace("capnp-noise://", "capnp://"),
                "must start with",
            ),
            (good.replace('@', "#"), "'@'"),
            (good.replacen(&v, &v[..58], 1), "VatId"),
            (format!("capnp-noise://{v}@host:1"), "object id"),
            (format!("capnp-noise://{v}@/{oid}"), "at least one address"),
            (format!("capnp-noise://{v}@host/{oid}"), "needs a port"),
            (format!("capnp-noise://{v}@host:0/{oid}"), "1 to 65535"),
            (format!("capnp-noise://{v}@host:65536/{oid}"), "1 to 65535"),
            (format!("capnp-noise://{v}@host:080/{oid}"), "leading zeros"),
            (format!("capnp-noise://{v}@::1:80/{oid}"), "brackets"),
            (format!("capnp-noise://{v}@[::1:80/{oid}"), "brackets"),
            (format!("capnp-noise://{v}@[::g]:80/{oid}"), "IPv6"),
            (format!("capnp-noise://{v}@[fe80::1%eth0]:80/{oid}"), "zone"),
            (format!("capnp-noise://{v}@1.2.3.256:80/{oid}"), "IPv4"),
            (format!("capnp-noise://{v}@a..b:80/{oid}"), "empty label"),
            (format!("capnp-noise://{v}@a*b:80/{oid}"), "'*'"),
            (
                format!("capnp-noise://{v}@a:1,,b:2/{oid}"),
                "invalid address",
            ),
            (format!("{good}?x=1"), "query"),
            (format!("{good}/more"), "one path segment"),
            (format!("capnp-noise://{v}@h:1/"), "empty"),
            (
                format!("capnp-noise://{v}@h:1/{}", &oid[..oid.len() - 1]),
                "canonical",
            ),
            (format!("capnp-noise://{v}@h:1/aaaaaaaa"), "16 to 64 bytes"),
            (
                format!("capnp-noise://{v}@h:1/{}", oid.to_uppercase()),
                "not one of",
            ),
            (format!("{good}\n"), "line break"),
            (
                format!("capnp-noise://{v}@{}/{oid}", vec!["h:1"; 17].join(",")),
                "the most is 16",
            ),
            ("x".repeat(MAX_URI_LEN + 1), "longer than"),
        ];
        for (input, want) in cases {
            let err = input.parse::<SturdyRef>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
            assert!(
                !err.contains(&oid[..20]),
                "error echoes the object id: {err}"
            );
        }
    }

    #[test]
    fn capnp_struct_round_trip_and_errors() {
        let sr = sample();
        let mut msg = capnp::message::Builder::new_default();
        sr.write_to(msg.init_root());
        let reader = msg.get_root_as_reader::<sturdy_ref::Reader>().unwrap();
        assert_eq!(SturdyRef::read_from(reader).unwrap(), sr);

        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b = msg.init_root::<sturdy_ref::Builder>();
            b.reborrow().init_vat_id().set_ed25519(vat().as_bytes());
            b.reborrow().init_addresses(1).set(0, "h:1");
            b.set_object_id(&[1; 8]);
        }
        let err = SturdyRef::read_from(msg.get_root_as_reader().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not 8"), "{err}");

        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b = msg.init_root::<sturdy_ref::Builder>();
            b.reborrow().init_vat_id().set_ed25519(vat().as_bytes());
            b.set_object_id(&[1; 16]);
        }
        let err = SturdyRef::read_from(msg.get_root_as_reader().unwrap()).unwrap_err();
        assert!(err.to_string().contains("at least one address"), "{err}");

        let mut msg = capnp::message::Builder::new_default();
        msg.init_root::<sturdy_ref::Builder>();
        let err = SturdyRef::read_from(msg.get_root_as_reader().unwrap()).unwrap_err();
        assert!(err.to_string().contains("vatId is missing"), "{err}");
    }

    #[test]
    fn longest_valid_uri_fits_the_limit() {
        let long_host = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long_host.len(), MAX_HOST_LEN);
        let addr: Address = format!("{long_host}:65535").parse().unwrap();
        let sr = SturdyRef::new(
            vat(),
            vec![addr; MAX_ADDRESSES],
            ObjectId::from_bytes(&[0xff; MAX_OBJECT_ID_LEN]).unwrap(),
        )
        .unwrap();
        let uri = sr.to_string();
        assert!(uri.len() <= MAX_URI_LEN, "{}", uri.len());
        assert_eq!(uri.parse::<SturdyRef>().unwrap(), sr);
    }

    #[test]
    fn addresses_are_canonical() {
        let a = Address::new(Host::Domain("Files.Example".into()), 80).unwrap();
        assert_eq!(a.to_string(), "files.example:80");
        assert!(Address::new(Host::Domain("a b".into()), 80).is_err());
        assert!(Address::new(Host::Domain("[::1]".into()), 80).is_err());
        assert!(Address::new(Host::Domain("1.2.3.4".into()), 80).is_err());
        assert!(Address::new(Host::Ipv4([1, 2, 3, 4].into()), 0).is_err());
        let v6: Address = "[0:0::1]:9".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:9");
        assert_eq!(v6.host(), &Host::Ipv6(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(v6.port(), 9);
    }

    #[test]
    fn object_ids() {
        let a = ObjectId::random();
        assert_eq!(a.as_bytes().len(), RANDOM_OBJECT_ID_LEN);
        assert_ne!(a, ObjectId::random());
        assert_eq!(a, ObjectId::from_bytes(a.as_bytes()).unwrap());
        let mut last_differs = a.as_bytes().to_vec();
        last_differs[31] ^= 1;
        assert_ne!(a, ObjectId::from_bytes(&last_differs).unwrap());
        assert_ne!(
            ObjectId::from_bytes(&[0; 16]).unwrap(),
            ObjectId::from_bytes(&[0; 17]).unwrap()
        );
        assert!(ObjectId::from_bytes(&[0; 15]).is_err());
        assert!(ObjectId::from_bytes(&[0; 65]).is_err());
        assert!(ObjectId::from_bytes(&[0; 64]).is_ok());
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(a.to_text().as_str()) && dbg.contains("32 bytes"));
    }

    #[test]
    fn restorer_adds_finds_and_revokes() {
        let mut r = Restorer::new();
        let one = r.add(1);
        let two = r.add(2);
        let chosen = ObjectId::from_bytes(&[9; 16]).unwrap();
        assert_eq!(r.insert(&chosen, 3), None);
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(&one), Some(&1));
        assert_eq!(r.restore(two.as_bytes()).unwrap(), &2);
        assert_eq!(r.restore(&[9; 16]).unwrap(), &3);

        let wrong = r.restore(&[9; 17]).unwrap_err().to_string();
        assert_eq!(r.revoke(&one), Some(1));
        assert_eq!(r.revoke(&one), None);
        let revoked = r.restore(one.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            wrong, revoked,
            "wrong and revoked ids must be indistinguishable"
        );
        assert!(r.restore(&[]).is_err());
        assert_eq!(r.get(&two), Some(&2));
        assert_eq!(r.insert(&chosen, 4), Some(3));
        assert!(!format!("{r:?}").contains(two.to_text().as_str()));
    }

    fn host() -> impl Strategy<Value = Host> {
        prop_oneof![
            "[a-z][a-z0-9_-]{0,10}(\\.[a-z0-9-]{1,8}){0,3}".prop_map(Host::Domain),
            any::<[u8; 4]>().prop_map(|b| Host::Ipv4(b.into())),
            any::<[u8; 16]>().prop_map(|b| Host::Ipv6(b.into())),
        ]
    }

    fn sturdy() -> impl Strategy<Value = SturdyRef> {
        (
            any::<[u8; 32]>(),
            prop::collection::vec((host(), 1..=u16::MAX), 1..=MAX_ADDRESSES),
            prop::collection::vec(any::<u8>(), MIN_OBJECT_ID_LEN..=MAX_OBJECT_ID_LEN),
        )
            .prop_map(|(seed, addrs, oid)| {
                SturdyRef::new(
                    Identity::from_seed(&seed).vat_id(),
                    addrs
                        .into_iter()
                        .map(|(h, p)| Address::new(h, p).unwrap())
                        .collect(),
                    ObjectId::from_bytes(&oid).unwrap(),
                )
                .unwrap()
            })
    }

    proptest! {
        #[test]
        fn uri_round_trips(sr in sturdy()) {
            let uri = sr.to_string();
            prop_assert!(uri.len() <= MAX_URI_LEN);
            let back: SturdyRef = uri.parse().unwrap();
            prop_assert_eq!(&back, &sr);
            prop_assert_eq!(back.to_string(), uri);
        }

        #[test]
        fn capnp_round_trips(sr in sturdy()) {
            let mut msg = capnp::message::Builder::new_default();
            sr.write_to(msg.init_root());
            let back = SturdyRef::read_from(msg.get_root_as_reader().unwrap()).unwrap();
            prop_assert_eq!(back, sr);
        }

        #[test]
        fn object_id_text_round_trips(oid in prop::collection::vec(any::<u8>(), 16..=64)) {
            let id = ObjectId::from_bytes(&oid).unwrap();
            prop_assert_eq!(ObjectId::from_text(&id.to_text()).unwrap(), id);
        }

        #[test]
        fn parser_never_panics(s in "capnp-noise://\\PC{0,200}") {
            let _ = s.parse::<SturdyRef>();
        }
    }
}

//! [`NetworkConfig`]: the settings of a [`Network`](super::Network).

use std::time::Duration;

use capnp::message::ReaderOptions;

use crate::intro::HandoffConfig;
use crate::stream::DEFAULT_HANDSHAKE_TIMEOUT;
use crate::sturdy::Address;
use crate::wire::HandshakeConfig;

/// Settings of a [`Network`](super::Network), given to
/// [`NetworkBuilder::config`](super::NetworkBuilder::config).
///
/// Start from [`Default`] and change what you need with the `with_*`
/// setters (the struct is `#[non_exhaustive]`, so a struct literal does not
/// compile outside this crate; assigning a field of a value also works):
///
/// ```
/// use std::time::Duration;
/// use capnp_noise::network::{HandoffConfig, NetworkConfig};
///
/// // 128 connections, of which 16 are kept for this vat's own dials.
/// let options = NetworkConfig::default()
///     .with_max_connections(128)
///     .with_reserved_for_dials(16)
///     .with_idle_timeout(Some(Duration::from_secs(300)))
///     .with_handoff(HandoffConfig::default().with_max_wait(Duration::from_secs(5)));
/// assert_eq!(options.max_connections, 128);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NetworkConfig {
    /// Suites accepted, in this vat's order of preference, and session
    /// settings. Incoming connections may use any of them; outgoing ones
    /// propose the first, and retry once with the mandatory suite when a
    /// vat closes without answering it and the list holds the mandatory
    /// suite (as [`rpc::connect`](crate::rpc::connect) does: see
    /// [`HandshakeConfig::fallback_after`]; the connection's
    /// [`PeerInfo::unanswered_suite`](crate::rpc::PeerInfo::unanswered_suite)
    /// then names the suite that was not answered). Default: every suite,
    /// the fastest on this machine first.
    pub handshake: HandshakeConfig,
    /// The longest one outgoing TCP connect may take, and then the handshake
    /// (and each again for a retry with the mandatory suite); also bounds
    /// `Vat.hello` and `provide`. Default 10 s.
    pub connect_timeout: Duration,
    /// The longest an incoming handshake may take. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Incoming handshakes past message 1 at once (see
    /// [`crate::admission`]). Default 64.
    pub max_handshakes: usize,
    /// Of those, at most this many from one source address (IPv4 address,
    /// IPv6 /64); more wait, unanswered, for one of theirs to end. Default 16.
    pub max_handshakes_per_source: usize,
    /// How long an incoming handshake that fails after message 1 keeps its
    /// slot (see [`crate::admission`]). Default 1 s.
    pub handshake_failure_hold: Duration,
    /// Connections open at once, in both directions. At the limit incoming
    /// connections wait and dials fail. Default 1024.
    pub max_connections: usize,
    /// Of `max_connections`, this many are kept for this vat's own dials
    /// (at most a quarter of `max_connections`): incoming connections hold
    /// at most the rest, so a flood of incoming connections cannot keep
    /// the vat from dialing out. Default 64 (with the default 1024
    /// connections, 960 are left for incoming ones).
    pub reserved_for_dials: usize,
    /// Incoming connections from one source address (IPv4 address, IPv6
    /// /64) open and not yet authenticated; more are closed as soon as they
    /// are accepted (see
    /// [`UnauthenticatedLimit`](crate::admission::UnauthenticatedLimit)).
    /// Default
    /// [`DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE`](crate::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE), 64.
    pub max_unauthenticated_per_source: usize,
    /// How long a new incoming connection has to deliver its preamble and
    /// message 1, separately from the handshake timeout (see
    /// [`StreamConfig::first_message_timeout`](crate::stream::StreamConfig::first_message_timeout)).
    /// Default
    /// [`DEFAULT_FIRST_MESSAGE_TIMEOUT`](crate::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT), 3 s.
    pub first_message_timeout: Duration,
    /// Incoming connections from one authenticated vat that wait for its
    /// `Vat.hello` (those a vat with a higher VatId initiated, SPEC.md
    /// §12.3); a further one is closed at once. Default 2: a crossed dial
    /// and a redial.
    pub max_unsettled_per_vat: usize,
    /// Close a connection after it moved no bytes for about this long (between
    /// once and 1.5 times it). Capabilities obtained over it break, as with
    /// any disconnect; a call waiting that long without traffic fails too.
    /// Default `None`: connections stay until a side closes them (or the
    /// keepalive finds the peer gone).
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on every connection, both directions: keeps the
    /// mapping of an idle connection in NATs whose idle timeout is longer,
    /// and fails a connection whose peer stopped answering within about
    /// twice this, after which the next [`Network::connect`](super::Network::connect)
    /// to that vat dials a new one (see
    /// [`DEFAULT_KEEPALIVE`](crate::rpc::DEFAULT_KEEPALIVE) for the
    /// probes, the typical NAT timeouts and the cost). `None`: the
    /// system's settings (Linux: no keepalive; a connection whose flow a
    /// NAT forgot then looks open, and is handed out, for about 15
    /// minutes). Default
    /// [`DEFAULT_KEEPALIVE`](crate::rpc::DEFAULT_KEEPALIVE), 30 s.
    pub keepalive: Option<Duration>,
    /// Limits on incoming messages, application calls included. Default:
    /// a traversal limit of 1 Mi words (8 MiB) per message, nesting 64.
    /// The network's own `Vat` calls need far less, and check the sizes of
    /// what they read themselves (SPEC.md §12.4.2); raise it if the
    /// application sends larger messages.
    pub reader_options: ReaderOptions,
    /// The addresses this vat tells others (in introductions of its
    /// capabilities). Empty (the default): the listener's local address.
    pub advertised_addresses: Vec<Address>,
    /// The most vats in the address book. Default 4096.
    pub max_known_vats: usize,
    /// The provider's handoff table: entries, waiting redeems, how long a
    /// redeem waits for the introducer's request (`max_wait`, default 30 s).
    pub handoff: HandoffConfig,
    /// How long introductions made by [`Network::introduce`](super::Network::introduce) are valid.
    /// Default 5 minutes.
    pub introduction_lifetime: Duration,
    /// The longest [`Network::redeem`](super::Network::redeem) waits for the provider's answer
    /// (which may itself wait for the introducer's request). Default 60 s.
    pub redeem_timeout: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            handshake: HandshakeConfig::default(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: crate::admission::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: crate::admission::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_failure_hold: crate::admission::DEFAULT_FAILURE_HOLD,
            max_connections: 1024,
            reserved_for_dials: 64,
            max_unauthenticated_per_source:
                crate::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            first_message_timeout: crate::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT,
            max_unsettled_per_vat: 2,
            idle_timeout: None,
            keepalive: Some(crate::rpc::DEFAULT_KEEPALIVE),
            reader_options: ReaderOptions {
                traversal_limit_in_words: Some(1 << 20),
                nesting_limit: 64,
            },
            advertised_addresses: Vec::new(),
            max_known_vats: 4096,
            handoff: HandoffConfig::default(),
            introduction_lifetime: Duration::from_secs(300),
            redeem_timeout: Duration::from_secs(60),
        }
    }
}

setters!(NetworkConfig {
    with_handshake => handshake: HandshakeConfig,
    with_connect_timeout => connect_timeout: Duration,
    with_handshake_timeout => handshake_timeout: Duration,
    with_max_handshakes => max_handshakes: usize,
    with_max_handshakes_per_source => max_handshakes_per_source: usize,
    with_handshake_failure_hold => handshake_failure_hold: Duration,
    with_max_connections => max_connections: usize,
    with_reserved_for_dials => reserved_for_dials: usize,
    with_max_unauthenticated_per_source => max_unauthenticated_per_source: usize,
    with_first_message_timeout => first_message_timeout: Duration,
    with_max_unsettled_per_vat => max_unsettled_per_vat: usize,
    with_idle_timeout => idle_timeout: Option<Duration>,
    with_keepalive => keepalive: Option<Duration>,
    with_reader_options => reader_options: ReaderOptions,
    with_advertised_addresses => advertised_addresses: Vec<Address>,
    with_max_known_vats => max_known_vats: usize,
    with_handoff => handoff: HandoffConfig,
    with_introduction_lifetime => introduction_lifetime: Duration,
    with_redeem_timeout => redeem_timeout: Duration,
});

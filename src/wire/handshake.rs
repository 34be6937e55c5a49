//! The Noise XX handshake as a sans-IO state machine (SPEC.md, "Handshake").
//!
//! ```text
//! initiator                                         responder
//!   preamble || len || msg1 (-> e)              ->
//!                                               <-  len || msg2 (<- e, ee, s, es; payload_R)
//!   [check responder's VatId; stop here if refused]
//!   len || msg3 (-> s, se; payload_I)           ->
//!                                                   [check initiator's VatId]
//! ```
//!
//! Feed received bytes with [`Handshake::feed`], send what
//! [`Handshake::pending_output`] holds, and once [`Handshake::is_finished`]
//! turn it into a [`Session`] with [`Handshake::into_session`]. Nothing the
//! peer sent after its last handshake message is lost: it moves into the
//! session, and so does any handshake output not yet sent.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::frame::{self, FrameBounds};
use super::preamble::{self, Pattern, Suite};
use super::resumption::{
    EarlyData, EarlyDataOutcome, KnownResponder, ResumptionConfig, EARLY_ACCEPTED, EARLY_NONE,
    EARLY_REFUSED, IK_MESSAGE_1_OVERHEAD, IK_MESSAGE_2_MAX, IK_MESSAGE_2_MIN, MAX_IK_MESSAGE_1_LEN,
    REPLY_FALLBACK, REPLY_IK,
};
use super::transport::{Session, SessionConfig};
use super::{
    payload, DH_LEN, HANDSHAKE_HASH_LEN, LENGTH_PREFIX_LEN, MAX_HANDSHAKE_PAYLOAD_LEN,
    MAX_MESSAGE_LEN, TAG_LEN,
};
use crate::error::{Error, ProtocolError};
use crate::identity::Identity;
use crate::keylog::{self, KeyLog, KeyRecorder};
use crate::policy::{PeerContext, PeerPolicy};
use crate::vat_id::VatId;

/// Which side of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected and sends the preamble and message 1.
    Initiator,
    /// The side that accepted and sends message 2.
    Responder,
}

/// Handshake settings shared by many connections: the Noise suites and the
/// session's settings. Start from [`Default`] (or
/// [`HandshakeConfig::with_suite`]) and change what you need with the
/// `with_*` setters.
///
/// ```
/// use capnp_noise::wire::{HandshakeConfig, SessionConfig, Suite};
///
/// // A responder that accepts only ChaCha20-Poly1305 and rekeys often.
/// let config = HandshakeConfig::default()
///     .with_suites(vec![Suite::ChaChaPolyBlake2s])
///     .with_session(SessionConfig::default().with_rekey_interval(1 << 20));
/// assert_eq!(config.suites, [Suite::ChaChaPolyBlake2s]);
/// ```
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// For a responder: the suites it accepts (it refuses any other by
    /// closing without a word, SPEC.md 2).
    ///
    /// For an initiator: the suites it accepts, in its order of
    /// preference. It proposes the first. If that is not
    /// [`Suite::MANDATORY`] and the list holds the mandatory suite too, a
    /// responder that closes without answering message 1 is tried once
    /// more, on a new connection, with the mandatory suite (SPEC.md 2): see
    /// [`fallback_after`](Self::fallback_after), which `rpc::connect` and
    /// the `Network` follow. A list of one suite never falls back.
    pub suites: Vec<Suite>,
    /// Settings of the session the handshake turns into.
    pub session: SessionConfig,
    /// Accept a peer whose VatId is this side's own. Default `false`: such
    /// a handshake fails with [`Error::PeerRefused`] before the policy is
    /// asked (so a TOFU policy never records it), because a vat that meets
    /// itself is almost always a connection reflected back to its own
    /// listener by a man in the middle (SPEC.md section 5.4). Set it only in
    /// a program that deliberately talks to itself.
    pub allow_self: bool,
    /// Where this side's handshakes write their secrets, for decrypting a
    /// capture later: see [`crate::keylog`]. Default `None`, and it must
    /// stay `None` outside research and debugging: whoever reads the log
    /// reads the sessions. The library never sets it by itself (not even
    /// from the environment).
    pub key_log: Option<Arc<dyn KeyLog>>,
}

impl Default for HandshakeConfig {
    /// Every suite, [`Suite::preferred`] for this machine first: initiators
    /// propose it (and fall back to the mandatory suite after a silent
    /// close, see [`fallback_after`](Self::fallback_after)); responders
    /// accept every suite.
    fn default() -> Self {
        let first = Suite::preferred();
        let mut suites = vec![first];
        suites.extend(Suite::ALL.iter().filter(|s| **s != first));
        HandshakeConfig {
            suites,
            session: SessionConfig::default(),
            allow_self: false,
            key_log: None,
        }
    }
}

impl HandshakeConfig {
    /// A config that proposes (or, for responders, accepts) only `suite`.
    pub fn with_suite(suite: Suite) -> Self {
        HandshakeConfig {
            suites: vec![suite],
            ..Default::default()
        }
    }

    /// After an initiator's handshake with this config failed with `error`:
    /// the config of the one retry SPEC.md 2 allows, to run on a **new
    /// connection** to the same responder, or `None`.
    ///
    /// A retry is due only when the responder closed without sending a
    /// byte of message 2 (`error` is [`Error::UnexpectedEof`] with
    /// [`EOF_BEFORE_MESSAGE_2`]: an EOF or a reset after message 1, never a
    /// timeout), when the suite proposed was not [`Suite::MANDATORY`], and
    /// when this config accepts the mandatory suite. The retry proposes
    /// only the mandatory suite, so a second silent close gives `None`.
    ///
    /// Safe because the first attempt revealed nothing (message 3, with
    /// this side's identity, was never sent), the retry is a fresh
    /// handshake, and the suite within it is bound by the prologue: an
    /// attacker who forces the retry by cutting the first connection only
    /// obtains a suite this side accepts anyway. A caller SHOULD report
    /// that the retry happened (the responder does not take the preferred
    /// suite).
    pub fn fallback_after(&self, error: &Error) -> Option<HandshakeConfig> {
        let silent =
            matches!(error, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2);
        let proposed = *self.suites.first()?;
        (silent && proposed != Suite::MANDATORY && self.suites.contains(&Suite::MANDATORY)).then(
            || HandshakeConfig {
                suites: vec![Suite::MANDATORY],
                ..self.clone()
            },
        )
    }
}

/// `during` of the [`Error::UnexpectedEof`] an initiator reports when the
/// byte stream ended (an EOF, a reset, any other end) after its message 1
/// and before a single byte of message 2: a *silent close* (SPEC.md 2).
/// What [`HandshakeConfig::fallback_after`] looks for.
pub const EOF_BEFORE_MESSAGE_2: &str = "before handshake message 2: the responder closed without answering message 1 (it may not accept this suite or protocol version, may not be a capnp-noise responder, or gave up before admitting the handshake)";

setters!(HandshakeConfig {
    with_suites => suites: Vec<Suite>,
    with_session => session: SessionConfig,
    with_allow_self => allow_self: bool,
    with_key_log => key_log: Option<Arc<dyn KeyLog>>,
});

/// The reason a handshake with oneself is refused.
pub(crate) const REFLECTED: &str = "the peer is this vat itself: a connection reflected back to its own listener (HandshakeConfig::allow_self permits it)";

/// Message 1: the initiator's ephemeral key, with an empty payload.
const MSG1_LEN: usize = DH_LEN;
/// Message 2: e, encrypted s (32 + 16), encrypted payload (payload + 16).
const MSG2_MIN: usize = DH_LEN + DH_LEN + TAG_LEN + TAG_LEN;
/// Message 3: encrypted s, encrypted payload.
const MSG3_MIN: usize = DH_LEN + TAG_LEN + TAG_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InitiatorAwaitMsg2,
    /// An `IK` initiator waits for the responder's answer: `IK` message 2
    /// or the `XX` fallback's message 2 (SPEC.md 14).
    InitiatorAwaitIkReply,
    ResponderAwaitPreamble,
    ResponderAwaitMsg1,
    ResponderAwaitAdmission,
    ResponderAwaitMsg3,
    Done,
}

/// An in-progress Noise XX handshake, initiator or responder.
pub struct Handshake {
    role: Role,
    state: State,
    config: HandshakeConfig,
    policy: Arc<dyn PeerPolicy>,
    ctx: PeerContext,
    /// This side's VatId: a peer proving the same one is refused unless
    /// `config.allow_self`.
    own: VatId,
    local_payload: Arc<[u8]>,
    static_key: Arc<super::resolver::StaticKeyPair>,
    fixed_ephemeral: Option<Zeroizing<[u8; 32]>>,
    /// Boxed: it is large (about 1 KiB) and absent until message 1.
    noise: Option<Box<snow::HandshakeState>>,
    suite: Option<Suite>,
    /// The responder's received preamble (the prologue), kept until message 1
    /// is in: the Noise state is built only then.
    prologue: Vec<u8>,
    /// The initiator's message 1 (its ephemeral key), kept while it waits
    /// for admission.
    msg1: Option<[u8; MSG1_LEN]>,
    /// The pattern the preamble named (`XX`, or `IK`: SPEC.md 14).
    pattern: Pattern,
    /// `IK` message 1: sent (initiator) or received (responder), kept for
    /// the fallback's prologue.
    ik_msg1: Vec<u8>,
    /// A responder's `IK` settings.
    resumption: ResumptionConfig,
    /// An `IK` initiator's record of the responder (boxed, like the other
    /// records here: a responder waiting for message 1 should stay small).
    known: Option<Box<KnownResponder>>,
    /// An `IK` initiator's early data, kept to send again if refused.
    early: Option<EarlyData>,
    /// Early data a responder accepted, delivered first by the session.
    early_in: Zeroizing<Vec<u8>>,
    early_outcome: EarlyDataOutcome,
    /// The `IK` handshake fell back to `XX`.
    fell_back: bool,
    /// What an initiator learned of the responder (SPEC.md 14.1).
    learned: Option<Box<KnownResponder>>,
    require_admission: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    output_pos: usize,
    peer: Option<VatId>,
    handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    error: Option<Error>,
    /// Only with a key log (boxed: a handshake without one, the usual
    /// case, pays one pointer for it; see tests/handshake_memory.rs).
    key_logging: Option<Box<KeyLogging>>,
}

/// What a handshake with a key log keeps for it.
#[derive(Default)]
struct KeyLogging {
    /// The cipher keys snow was given so far.
    recorder: Option<KeyRecorder>,
    /// The initiator's ephemeral key, which names the session in the log.
    initiator_ephemeral: [u8; DH_LEN],
    /// How many handshake keys have been logged.
    logged: usize,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("suite", &self.suite)
            .field("peer", &self.peer)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// The most surplus input (bytes after the last handshake message) kept for
/// the session: one maximal transport frame.
const MAX_SURPLUS: usize = LENGTH_PREFIX_LEN + MAX_MESSAGE_LEN;

impl Handshake {
    /// Starts a handshake as the initiator. The preamble and message 1 are
    /// ready in [`pending_output`](Self::pending_output) at once.
    ///
    /// `policy` decides, after message 2, whether the responder's proven
    /// VatId is acceptable; if not, the handshake fails with
    /// [`Error::PeerRefused`] and message 3 (which would reveal this side's
    /// identity) is never produced.
    ///
    /// # Errors
    /// [`Error::Config`] if `config.suites` is empty.
    pub fn initiator(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
    ) -> Result<Self, Error> {
        Self::initiator_inner(identity, policy, ctx, config, None)
    }

    /// Starts a handshake as the responder. It sends nothing until the
    /// initiator's preamble and message 1 have arrived.
    ///
    /// # Errors
    /// [`Error::Config`] if `config.suites` is empty.
    pub fn responder(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
    ) -> Result<Self, Error> {
        Self::responder_inner(identity, policy, ctx, config, None)
    }

    /// Like [`initiator`](Self::initiator) with a fixed ephemeral key, for
    /// test vectors and fuzzing. Never use it in production: a fixed
    /// ephemeral key destroys forward secrecy.
    ///
    /// # Errors
    /// As [`initiator`](Self::initiator).
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn initiator_with_fixed_ephemeral(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        ephemeral: [u8; 32],
    ) -> Result<Self, Error> {
        Self::initiator_inner(
            identity,
            policy,
            ctx,
            config,
            Some(Zeroizing::new(ephemeral)),
        )
    }

    /// Like [`responder`](Self::responder) with a fixed ephemeral key, for
    /// test vectors and fuzzing only.
    ///
    /// # Errors
    /// As [`responder`](Self::responder).
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn responder_with_fixed_ephemeral(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        ephemeral: [u8; 32],
    ) -> Result<Self, Error> {
        Self::responder_inner(
            identity,
            policy,
            ctx,
            config,
            Some(Zeroizing::new(ephemeral)),
        )
    }

    fn new(
        role: Role,
        state: State,
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        fixed_ephemeral: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Self, Error> {
        if config.suites.is_empty() {
            return Err(Error::Config("no Noise suite configured".into()));
        }
        let key_logging = config.key_log.as_ref().map(|_| Box::default());
        Ok(Handshake {
            role,
            state,
            config,
            policy,
            ctx,
            own: identity.vat_id(),
            local_payload: identity.handshake_payload().clone(),
            static_key: identity.noise_static_key().clone(),
            fixed_ephemeral,
            noise: None,
            suite: None,
            prologue: Vec::new(),
            msg1: None,
            pattern: Pattern::XX,
            ik_msg1: Vec::new(),
            resumption: ResumptionConfig::default(),
            known: None,
            early: None,
            early_in: Zeroizing::new(Vec::new()),
            early_outcome: EarlyDataOutcome::NotSent,
            fell_back: false,
            learned: None,
            require_admission: false,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            peer: None,
            handshake_hash: [0; HANDSHAKE_HASH_LEN],
            error: None,
            key_logging,
        })
    }

    fn initiator_inner(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        fixed_ephemeral: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Self, Error> {
        let mut hs = Self::new(
            Role::Initiator,
            State::InitiatorAwaitMsg2,
            identity,
            policy,
            ctx,
            config,
            fixed_ephemeral,
        )?;
        let suite = hs.config.suites[0];
        let pre = preamble::encode(suite);
        let (noise, msg1) = hs.write_xx_msg1(suite, &pre)?;
        hs.output.extend_from_slice(&pre);
        frame::put_len(&mut hs.output, MSG1_LEN);
        hs.output.extend_from_slice(&msg1);
        hs.noise = Some(Box::new(noise));
        hs.suite = Some(suite);
        Ok(hs)
    }

    /// Starts an `IK` handshake (SPEC.md 14) with a responder this side
    /// knows: message 1 is encrypted to `known`'s static key and carries
    /// this side's identity and, optionally, `early` data, the first bytes
    /// of the stream. The preamble and message 1 are ready in
    /// [`pending_output`](Self::pending_output) at once.
    ///
    /// The responder answers with `IK` message 2 (the handshake then ends
    /// there: the initiator sends no third message) or, if it cannot
    /// decrypt message 1 (its static key changed, or it does not take `IK`),
    /// with the `XX` fallback, which runs every check of `XX`. Either way
    /// the responder's signature is verified and `policy` asked, as in `XX`.
    /// Early data the responder refused, or could not read, is sent again
    /// as the first transport data ([`early_data_outcome`](Self::early_data_outcome)).
    ///
    /// After success, [`learned_responder`](Self::learned_responder) is the
    /// record to keep (a fallback changes the static key). After a silent
    /// close ([`EOF_BEFORE_MESSAGE_2`]: a responder of revision 1.1 closes so
    /// on an `IK` preamble), retry once with [`initiator`](Self::initiator)
    /// on a new connection and forget the record (SPEC.md 14.6).
    ///
    /// # Errors
    /// [`Error::Config`] if `config.suites` is empty or lacks `known`'s
    /// suite, or if the early data does not fit message 1 (4096 bytes);
    /// [`Error::Protocol`] if `known`'s static key is a low-order point.
    pub fn initiator_resuming(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        known: &KnownResponder,
        early: Option<EarlyData>,
    ) -> Result<Self, Error> {
        Self::initiator_resuming_inner(identity, policy, ctx, config, known, early, None)
    }

    /// Like [`initiator_resuming`](Self::initiator_resuming) with a fixed
    /// ephemeral key, for test vectors and fuzzing only.
    ///
    /// # Errors
    /// As [`initiator_resuming`](Self::initiator_resuming).
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn initiator_resuming_with_fixed_ephemeral(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        known: &KnownResponder,
        early: Option<EarlyData>,
        ephemeral: [u8; 32],
    ) -> Result<Self, Error> {
        Self::initiator_resuming_inner(
            identity,
            policy,
            ctx,
            config,
            known,
            early,
            Some(Zeroizing::new(ephemeral)),
        )
    }

    fn initiator_resuming_inner(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        known: &KnownResponder,
        early: Option<EarlyData>,
        fixed_ephemeral: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Self, Error> {
        let mut hs = Self::new(
            Role::Initiator,
            State::InitiatorAwaitIkReply,
            identity,
            policy,
            ctx,
            config,
            fixed_ephemeral,
        )?;
        let suite = known.suite();
        if !hs.config.suites.contains(&suite) {
            return Err(Error::Config(format!(
                "the known responder answered {suite}, which this config does not accept"
            )));
        }
        // The ephemeral key is chosen here, not by snow: the fallback
        // (SPEC.md 14.4) runs XX with the same one.
        if hs.fixed_ephemeral.is_none() {
            let mut e = Zeroizing::new([0u8; 32]);
            super::resolver::resolver_knowing(None)
                .resolve_rng()
                .ok_or(Error::Config("no random number generator".into()))?
                .try_fill_bytes(e.as_mut())
                .map_err(|e| Error::from_snow(e, "choosing an ephemeral key"))?;
            hs.fixed_ephemeral = Some(e);
        }
        hs.suite = Some(suite);
        hs.pattern = Pattern::IK;
        hs.known = Some(Box::new(known.clone()));
        hs.early = early.filter(|e| !e.as_bytes().is_empty());
        hs.write_ik_msg1()?;
        Ok(hs)
    }

    /// Writes the preamble and `IK` message 1 (SPEC.md 14.3).
    fn write_ik_msg1(&mut self) -> Result<(), Error> {
        let suite = self.suite.expect("chosen");
        let known = self
            .known
            .as_ref()
            .expect("an IK initiator knows the responder");
        let id_len = self.local_payload.len();
        let early_len = self.early.as_ref().map_or(0, |e| e.as_bytes().len());
        let room = MAX_IK_MESSAGE_1_LEN.saturating_sub(IK_MESSAGE_1_OVERHEAD + id_len);
        if IK_MESSAGE_1_OVERHEAD + id_len + early_len > MAX_IK_MESSAGE_1_LEN {
            return Err(Error::Config(format!(
                "early data of {early_len} bytes does not fit IK message 1 (at most {room} bytes with this identity)"
            )));
        }
        let pre = preamble::encode_for(suite, Pattern::IK);
        let static_key = *known.static_key();
        let mut noise = self.build_noise_for(Pattern::IK, suite, &pre, Some(&static_key))?;
        let mut p1 = Zeroizing::new(Vec::with_capacity(2 + id_len + early_len));
        p1.extend_from_slice(&(id_len as u16).to_be_bytes());
        p1.extend_from_slice(&self.local_payload);
        if let Some(e) = &self.early {
            p1.extend_from_slice(e.as_bytes());
        }
        let mut msg1 = vec![0u8; IK_MESSAGE_1_OVERHEAD + id_len + early_len];
        let n = noise
            .write_message(&p1, &mut msg1)
            .map_err(|e| Error::from_snow(e, "IK handshake message 1 (the known static key)"))?;
        msg1.truncate(n);
        self.output.clear();
        self.output_pos = 0;
        self.output.extend_from_slice(&pre);
        frame::put_len(&mut self.output, n);
        self.output.extend_from_slice(&msg1);
        self.ik_msg1 = msg1;
        self.prologue = pre;
        self.noise = Some(Box::new(noise));
        Ok(())
    }

    /// Builds an `XX` initiator's Noise state and writes message 1 (`e`).
    fn write_xx_msg1(
        &mut self,
        suite: Suite,
        prologue: &[u8],
    ) -> Result<(snow::HandshakeState, [u8; MSG1_LEN]), Error> {
        let mut noise = self.build_noise(suite, prologue)?;
        let mut msg1 = [0u8; MSG1_LEN + TAG_LEN]; // snow wants room for a tag it does not write here
        let n = noise
            .write_message(&[], &mut msg1)
            .map_err(|e| Error::from_snow(e, "handshake message 1"))?;
        debug_assert_eq!(n, MSG1_LEN);
        let mut e = [0u8; MSG1_LEN];
        e.copy_from_slice(&msg1[..MSG1_LEN]);
        if let Some(k) = &mut self.key_logging {
            k.initiator_ephemeral = e;
        }
        Ok((noise, e))
    }

    fn responder_inner(
        identity: &Identity,
        policy: Arc<dyn PeerPolicy>,
        ctx: PeerContext,
        config: HandshakeConfig,
        fixed_ephemeral: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Self, Error> {
        Self::new(
            Role::Responder,
            State::ResponderAwaitPreamble,
            identity,
            policy,
            ctx,
            config,
            fixed_ephemeral,
        )
    }

    fn build_noise(
        &mut self,
        suite: Suite,
        prologue: &[u8],
    ) -> Result<snow::HandshakeState, Error> {
        self.build_noise_for(Pattern::XX, suite, prologue, None)
    }

    fn build_noise_for(
        &mut self,
        pattern: Pattern,
        suite: Suite,
        prologue: &[u8],
        remote_static: Option<&[u8; 32]>,
    ) -> Result<snow::HandshakeState, Error> {
        let params = suite.params_for(pattern);
        let mut resolver = super::resolver::resolver_knowing(Some(self.static_key.clone()));
        if self.logs_keys() {
            if let Some(k) = &mut self.key_logging {
                let keys = KeyRecorder::default();
                resolver = keylog::recording(resolver, keys.clone());
                k.recorder = Some(keys);
            }
        }
        let mut b = snow::Builder::with_resolver(params, resolver)
            .prologue(prologue)
            .and_then(|b| b.local_private_key(self.static_key.secret()))
            .map_err(|e| Error::from_snow(e, "building the Noise state"))?;
        if let Some(rs) = remote_static {
            b = b
                .remote_public_key(rs)
                .map_err(|e| Error::from_snow(e, "building the Noise state"))?;
        }
        if let Some(e) = &self.fixed_ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e.as_ref());
        }
        match self.role {
            Role::Initiator => b.build_initiator(),
            Role::Responder => b.build_responder(),
        }
        .map_err(|e| Error::from_snow(e, "building the Noise state"))
    }

    /// Replaces the payload this side sends (tests of forged identity claims).
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn replace_payload_for_tests(&mut self, payload: Arc<[u8]>) {
        self.local_payload = payload;
        if self.state == State::InitiatorAwaitIkReply {
            // IK message 1 carries it: write it again.
            self.write_ik_msg1()
                .expect("the payload of a test fits IK message 1");
        }
    }

    /// Makes a responder stop after a well-formed message 1 until
    /// [`admit`](Self::admit) is called, so that a server can bound the
    /// Diffie-Hellman work it spends on unauthenticated peers
    /// ([`crate::admission`]). Until then the responder has done no
    /// public-key work for this peer, and it has built no Noise state. No
    /// effect on an initiator, or once message 1 has been processed.
    pub fn require_admission(&mut self) {
        self.require_admission = self.role == Role::Responder;
    }

    /// Sets a responder's `IK` settings (SPEC.md 14; default: every `IK`
    /// message 1 answered with the `XX` fallback, see [`ResumptionConfig`]).
    /// No effect on an initiator.
    pub fn set_resumption(&mut self, config: ResumptionConfig) {
        self.resumption = config;
    }

    /// The handshake pattern: `IK` for a resumption (also after its `XX`
    /// fallback), `XX` otherwise. A responder knows it after the preamble.
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// True if an `IK` handshake fell back to `XX` (SPEC.md 14.4).
    pub fn fell_back(&self) -> bool {
        self.fell_back
    }

    /// What became of early data: on an initiator once the handshake has
    /// finished, on a responder once it answered message 1.
    pub fn early_data_outcome(&self) -> EarlyDataOutcome {
        self.early_outcome
    }

    /// An initiator's record of the responder, once the handshake has
    /// finished: its VatId, the static key the handshake authenticated, and
    /// its binding signature. Keep it (in a
    /// [`ResumptionCache`](super::resumption::ResumptionCache)) to resume
    /// with [`initiator_resuming`](Self::initiator_resuming) next time.
    pub fn learned_responder(&self) -> Option<KnownResponder> {
        self.is_finished()
            .then(|| self.learned.as_deref().cloned())
            .flatten()
    }

    /// True once a responder has received the preamble and a well-formed
    /// message 1 (always true for an initiator).
    pub fn received_message_1(&self) -> bool {
        !matches!(
            self.state,
            State::ResponderAwaitPreamble | State::ResponderAwaitMsg1
        )
    }

    /// True while a responder holds a well-formed message 1 and waits for
    /// [`admit`](Self::admit) (see [`require_admission`](Self::require_admission)).
    pub fn awaits_admission(&self) -> bool {
        self.state == State::ResponderAwaitAdmission && self.error.is_none()
    }

    /// Lets a responder waiting for admission answer message 1: it computes
    /// message 2 (three X25519 operations), ready in
    /// [`pending_output`](Self::pending_output).
    ///
    /// # Errors
    /// [`Error::Misuse`] if the handshake is not waiting for admission; the
    /// handshake's sticky error if it failed.
    pub fn admit(&mut self) -> Result<(), Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.state != State::ResponderAwaitAdmission {
            return Err(Error::Misuse(
                "admit() called on a handshake that is not waiting for admission",
            ));
        }
        let result = self.respond_to_msg1().and_then(|()| self.advance());
        if let Err(e) = &result {
            self.error = Some(e.clone());
            self.input.clear();
        }
        result
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The suite in use, once known (at once for an initiator; after the
    /// preamble for a responder).
    pub fn suite(&self) -> Option<Suite> {
        self.suite
    }

    /// True once the handshake has completed successfully.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done && self.error.is_none()
    }

    /// True while the handshake needs more bytes from the peer.
    pub fn wants_read(&self) -> bool {
        self.state != State::Done && self.error.is_none()
    }

    /// The error that ended this handshake, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// The peer's authenticated VatId, once proven and accepted.
    pub fn peer_vat_id(&self) -> Option<VatId> {
        if self.is_finished() {
            self.peer
        } else {
            None
        }
    }

    /// Bytes to send to the peer now.
    pub fn pending_output(&self) -> &[u8] {
        &self.output[self.output_pos..]
    }

    /// Marks `n` bytes of [`pending_output`](Self::pending_output) as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.output_pos = (self.output_pos + n).min(self.output.len());
        if self.output_pos == self.output.len() {
            self.output.clear();
            self.output_pos = 0;
        }
    }

    /// Feeds bytes received from the peer and advances the handshake as far
    /// as they allow.
    ///
    /// Returns how many bytes were taken: all of them, except when the
    /// handshake has finished and more than one maximal transport frame
    /// follows it in `input` (feed the rest to the session), and when a
    /// responder that [requires admission](Self::require_admission) has
    /// just taken message 1 (feed the rest after [`admit`](Self::admit):
    /// the outcome is the same as without admission).
    ///
    /// # Errors
    /// Any failure of the peer's messages: [`Error::Protocol`] for bytes that
    /// break the wire format, [`Error::Decrypt`] for a message that fails
    /// authentication, [`Error::BadIdentityProof`] for a bad identity
    /// signature, [`Error::PeerRefused`] when the policy refuses the peer.
    /// Errors are sticky: later calls return the same error.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut taken = 0;
        while taken < input.len() {
            let room = match self.state {
                State::Done => MAX_SURPLUS.saturating_sub(self.input.len()),
                _ => self.bytes_wanted(),
            };
            if room == 0 {
                break;
            }
            let n = room.min(input.len() - taken);
            self.input.extend_from_slice(&input[taken..taken + n]);
            taken += n;
            if let Err(e) = self.advance() {
                self.error = Some(e.clone());
                self.input.clear();
                return Err(e);
            }
        }
        Ok(taken)
    }

    /// Tells the handshake that the peer's byte stream ended (or was reset).
    /// Returns the error that describes it, which also sticks: an
    /// [`Error::UnexpectedEof`] naming the step, for an initiator that has
    /// no byte of message 2 yet [`EOF_BEFORE_MESSAGE_2`] (a silent close,
    /// see [`HandshakeConfig::fallback_after`]). After a finished handshake
    /// this is not an error of the handshake: it returns `None` and the
    /// session reports it instead.
    pub fn feed_eof(&mut self) -> Option<Error> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        let during = match self.state {
            State::Done => return None,
            State::InitiatorAwaitMsg2 | State::InitiatorAwaitIkReply if self.input.is_empty() => {
                EOF_BEFORE_MESSAGE_2
            }
            State::InitiatorAwaitMsg2 => "in the middle of handshake message 2",
            State::InitiatorAwaitIkReply => "in the middle of the answer to IK message 1",
            State::ResponderAwaitPreamble => "before the preamble was complete",
            State::ResponderAwaitMsg1 => "before handshake message 1 was complete",
            State::ResponderAwaitAdmission => "while its message 1 waited for admission",
            State::ResponderAwaitMsg3 => {
                "before handshake message 3 (the initiator may have refused this responder's identity)"
            }
        };
        let e = Error::UnexpectedEof { during };
        self.error = Some(e.clone());
        Some(e)
    }

    /// How many more bytes the current step can use before it must be processed.
    fn bytes_wanted(&self) -> usize {
        match self.state {
            State::ResponderAwaitPreamble => {
                // Take the fixed part first, then exactly the announced name.
                let fixed = preamble::MAGIC.len() + 2;
                if self.input.len() < fixed {
                    fixed - self.input.len()
                } else {
                    (fixed + self.input[fixed - 1] as usize)
                        .saturating_sub(self.input.len())
                        .max(1)
                }
            }
            State::Done | State::ResponderAwaitAdmission => 0,
            _ => match frame::peek_len(&self.input) {
                None => LENGTH_PREFIX_LEN - self.input.len(),
                Some(len) => (LENGTH_PREFIX_LEN + len)
                    .saturating_sub(self.input.len())
                    .max(1),
            },
        }
    }

    fn advance(&mut self) -> Result<(), Error> {
        loop {
            let before = self.state;
            match self.state {
                State::ResponderAwaitPreamble => self.on_preamble()?,
                State::ResponderAwaitMsg1 => self.on_msg1()?,
                State::ResponderAwaitMsg3 => self.on_msg3()?,
                State::InitiatorAwaitMsg2 => self.on_msg2()?,
                State::InitiatorAwaitIkReply => self.on_ik_reply()?,
                State::Done | State::ResponderAwaitAdmission => return Ok(()),
            }
            if self.state == before {
                return Ok(());
            }
        }
    }

    fn on_preamble(&mut self) -> Result<(), Error> {
        let Some(parsed) = preamble::parse(&self.input, &self.config.suites)? else {
            return Ok(());
        };
        // The Noise state is built when message 1 is in: a peer that sends
        // only a preamble costs no key material.
        self.prologue = self.input.drain(..parsed.len).collect();
        self.suite = Some(parsed.suite);
        self.pattern = parsed.pattern;
        self.state = State::ResponderAwaitMsg1;
        Ok(())
    }

    /// Splits the next complete frame off the input, if there is one.
    fn take_frame(&mut self, bounds: FrameBounds) -> Result<Option<Vec<u8>>, Error> {
        let Some((body, used)) = frame::split_frame(&self.input, bounds)? else {
            return Ok(None);
        };
        let body = body.to_vec();
        self.input.drain(..used);
        Ok(Some(body))
    }

    fn on_msg1(&mut self) -> Result<(), Error> {
        let bounds = match self.pattern {
            Pattern::XX => FrameBounds {
                min: MSG1_LEN,
                max: MSG1_LEN,
                what: "handshake message 1",
            },
            Pattern::IK => FrameBounds {
                min: IK_MESSAGE_1_OVERHEAD,
                max: MAX_IK_MESSAGE_1_LEN,
                what: "IK handshake message 1",
            },
        };
        let Some(msg1) = self.take_frame(bounds)? else {
            return Ok(());
        };
        if self.pattern == Pattern::IK {
            self.ik_msg1 = msg1;
        } else {
            let mut e = [0u8; MSG1_LEN];
            e.copy_from_slice(&msg1);
            self.msg1 = Some(e);
        }
        if self.require_admission {
            self.state = State::ResponderAwaitAdmission;
            return Ok(());
        }
        self.respond_to_msg1()
    }

    /// Builds the responder's Noise state, reads message 1 and writes message 2.
    fn respond_to_msg1(&mut self) -> Result<(), Error> {
        if self.pattern == Pattern::IK {
            return self.respond_to_ik_msg1();
        }
        let suite = self.suite.expect("known after the preamble");
        let msg1 = self.msg1.take().expect("message 1 received");
        let prologue = std::mem::take(&mut self.prologue);
        self.answer_xx_msg1(suite, &prologue, &msg1, None)
    }

    /// Reads an `XX` message 1 (`e`) and writes message 2, preceded by
    /// `kind` in its frame when it answers an `IK` message 1 (the fallback).
    fn answer_xx_msg1(
        &mut self,
        suite: Suite,
        prologue: &[u8],
        e: &[u8],
        kind: Option<u8>,
    ) -> Result<(), Error> {
        if let (Some(k), Ok(e)) = (&mut self.key_logging, e.try_into()) {
            k.initiator_ephemeral = e;
        }
        let mut noise = self.build_noise(suite, prologue)?;
        let mut empty = [0u8; 0];
        noise
            .read_message(e, &mut empty)
            .map_err(|e| Error::from_snow(e, "handshake message 1"))?;
        let mut msg2 = vec![0u8; MSG2_MIN + self.local_payload.len()];
        let n = noise
            .write_message(&self.local_payload, &mut msg2)
            .map_err(|e| match e {
                // Writing message 2 is where the responder first uses the
                // initiator's ephemeral key (`ee`, `es`): the key came in message 1.
                snow::Error::Dh => ProtocolError::LowOrderKey("handshake message 1").into(),
                e => Error::from_snow(e, "handshake message 2"),
            })?;
        frame::put_len(&mut self.output, n + usize::from(kind.is_some()));
        self.output.extend(kind);
        self.output.extend_from_slice(&msg2[..n]);
        self.noise = Some(Box::new(noise));
        self.log_new_keys();
        self.state = State::ResponderAwaitMsg3;
        Ok(())
    }

    /// Answers an `IK` message 1 (SPEC.md 14.3): `IK` message 2 if it
    /// decrypts, else the `XX` fallback (14.4).
    fn respond_to_ik_msg1(&mut self) -> Result<(), Error> {
        let suite = self.suite.expect("known after the preamble");
        let msg1 = std::mem::take(&mut self.ik_msg1);
        let prologue = std::mem::take(&mut self.prologue);
        if self.resumption.accept_ik {
            let mut noise = self.build_noise_for(Pattern::IK, suite, &prologue, None)?;
            let mut p1 = Zeroizing::new(vec![0u8; msg1.len()]);
            match noise.read_message(&msg1, &mut p1) {
                Ok(n) => return self.answer_ik(noise, &p1[..n]),
                // Encrypted to another static key (or altered): fall back.
                Err(snow::Error::Decrypt) => {}
                Err(e) => return Err(Error::from_snow(e, "IK handshake message 1")),
            }
        }
        // Whatever early data message 1 held is lost unread (this side
        // cannot tell whether there was any); the initiator sends it again
        // after the fallback.
        self.fell_back = true;
        let mut fallback_prologue = prologue;
        fallback_prologue.extend_from_slice(&msg1);
        self.answer_xx_msg1(
            suite,
            &fallback_prologue,
            &msg1[..DH_LEN],
            Some(REPLY_FALLBACK),
        )
    }

    /// Checks the initiator's identity in a decrypted `IK` message 1 and
    /// writes `IK` message 2: the handshake is then complete.
    fn answer_ik(&mut self, mut noise: snow::HandshakeState, p1: &[u8]) -> Result<(), Error> {
        let (id, early) = split_ik_payload(p1)?;
        let rs: [u8; 32] = noise
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::BadIdentityProof("no Noise static key was received"))?;
        let (vat_id, _) = payload::authenticate(id, &rs)?;
        self.accept_peer(vat_id)?;
        let status = if early.is_empty() {
            EARLY_NONE
        } else if self.resumption.accept_early_data {
            self.early_in = Zeroizing::new(early.to_vec());
            self.early_outcome = EarlyDataOutcome::Accepted;
            EARLY_ACCEPTED
        } else {
            self.early_outcome = EarlyDataOutcome::Refused;
            EARLY_REFUSED
        };
        let mut p2 = Vec::with_capacity(1 + self.local_payload.len());
        p2.push(status);
        p2.extend_from_slice(&self.local_payload);
        let mut msg2 = vec![0u8; IK_MESSAGE_2_MIN + self.local_payload.len()];
        let n = noise
            .write_message(&p2, &mut msg2)
            .map_err(|e| Error::from_snow(e, "IK handshake message 2"))?;
        frame::put_len(&mut self.output, n + 1);
        self.output.push(REPLY_IK);
        self.output.extend_from_slice(&msg2[..n]);
        self.noise = Some(Box::new(noise));
        self.peer = Some(vat_id);
        self.finish();
        Ok(())
    }

    /// The initiator reads the responder's answer to `IK` message 1.
    fn on_ik_reply(&mut self) -> Result<(), Error> {
        let Some(reply) = self.take_frame(FrameBounds {
            min: 1 + IK_MESSAGE_2_MIN,
            max: 1 + MSG2_MIN + MAX_HANDSHAKE_PAYLOAD_LEN,
            what: "the answer to IK handshake message 1",
        })?
        else {
            return Ok(());
        };
        let (kind, msg) = reply.split_first().expect("at least the minimum length");
        match *kind {
            REPLY_IK => {
                if msg.len() > IK_MESSAGE_2_MAX {
                    return Err(ProtocolError::FrameTooLong {
                        len: reply.len(),
                        max: 1 + IK_MESSAGE_2_MAX,
                        what: "IK handshake message 2",
                    }
                    .into());
                }
                self.on_ik_msg2(msg)
            }
            REPLY_FALLBACK => {
                if msg.len() < MSG2_MIN {
                    return Err(ProtocolError::FrameTooShort {
                        len: reply.len(),
                        min: 1 + MSG2_MIN,
                        what: "fallback handshake message 2",
                    }
                    .into());
                }
                self.on_fallback_msg2(msg)
            }
            other => Err(ProtocolError::UnknownReplyKind(other).into()),
        }
    }

    fn on_ik_msg2(&mut self, msg: &[u8]) -> Result<(), Error> {
        let noise = self.noise.as_mut().expect("initiator state");
        let mut p2 = vec![0u8; msg.len()];
        let n = noise
            .read_message(msg, &mut p2)
            .map_err(|e| Error::from_snow(e, "IK handshake message 2"))?;
        let Some((&status, id)) = p2[..n].split_first() else {
            return Err(
                ProtocolError::BadPayload("IK message 2 has no early-data status".into()).into(),
            );
        };
        self.early_outcome = match (status, self.early.is_some()) {
            (EARLY_NONE, false) => EarlyDataOutcome::NotSent,
            (EARLY_ACCEPTED, true) => EarlyDataOutcome::Accepted,
            (EARLY_REFUSED, true) => EarlyDataOutcome::Refused,
            (status, sent) => {
                return Err(ProtocolError::BadPayload(format!(
                "IK message 2: early-data status {status:#04x} is not an answer to {} early data",
                if sent { "some" } else { "no" }
            ))
                .into())
            }
        };
        let known = self
            .known
            .clone()
            .expect("an IK initiator knows the responder");
        // The static key is the one message 1 was encrypted to, and message
        // 2 decrypted only if the responder holds its private key.
        let (vat_id, signature) = payload::authenticate(id, known.static_key())?;
        if vat_id != known.vat_id() {
            return Err(Error::PeerRefused {
                vat_id,
                reason: "the responder proved another VatId than the one its known static key was recorded for".into(),
            });
        }
        self.accept_peer(vat_id)?;
        self.peer = Some(vat_id);
        self.learned = Some(Box::new(KnownResponder::verified(
            vat_id,
            *known.static_key(),
            signature,
            known.suite(),
        )));
        self.finish();
        Ok(())
    }

    /// The responder could not decrypt `IK` message 1: continue as the `XX`
    /// initiator of SPEC.md 14.4, with the same ephemeral key, and run every
    /// check of `XX` message 2.
    fn on_fallback_msg2(&mut self, msg2: &[u8]) -> Result<(), Error> {
        let suite = self.suite.expect("known");
        let mut prologue = std::mem::take(&mut self.prologue);
        prologue.extend_from_slice(&self.ik_msg1);
        // XX message 1 is the `e` IK message 1 sent: nothing new is sent.
        let (noise, e) = self.write_xx_msg1(suite, &prologue)?;
        debug_assert_eq!(e[..], self.ik_msg1[..DH_LEN]);
        self.noise = Some(Box::new(noise));
        self.fell_back = true;
        if self.early.is_some() {
            self.early_outcome = EarlyDataOutcome::FellBack;
        }
        self.answer_msg2(msg2, "fallback handshake message 2")
    }

    fn on_msg2(&mut self) -> Result<(), Error> {
        let Some(msg2) = self.take_frame(FrameBounds {
            min: MSG2_MIN,
            max: MSG2_MIN + MAX_HANDSHAKE_PAYLOAD_LEN,
            what: "handshake message 2",
        })?
        else {
            return Ok(());
        };
        self.answer_msg2(&msg2, "handshake message 2")
    }

    /// Reads `XX` message 2, checks the responder, writes message 3.
    fn answer_msg2(&mut self, msg2: &[u8], during: &'static str) -> Result<(), Error> {
        self.read_payload_and_authenticate(msg2, during)?;
        // Only now, with the responder accepted, reveal who we are.
        let noise = self.noise.as_mut().expect("initiator state");
        let mut msg3 = vec![0u8; MSG3_MIN + self.local_payload.len()];
        let n = noise
            .write_message(&self.local_payload, &mut msg3)
            .map_err(|e| Error::from_snow(e, "handshake message 3"))?;
        frame::put_len(&mut self.output, n);
        self.output.extend_from_slice(&msg3[..n]);
        self.log_new_keys();
        self.finish();
        Ok(())
    }

    fn on_msg3(&mut self) -> Result<(), Error> {
        let Some(msg3) = self.take_frame(FrameBounds {
            min: MSG3_MIN,
            max: MSG3_MIN + MAX_HANDSHAKE_PAYLOAD_LEN,
            what: "handshake message 3",
        })?
        else {
            return Ok(());
        };
        self.read_payload_and_authenticate(&msg3, "handshake message 3")?;
        self.finish();
        Ok(())
    }

    /// Decrypts a message carrying the peer's payload, and checks everything
    /// about the peer's identity in one place: the payload decodes, its
    /// signature binds the claimed VatId to the Noise static key that the
    /// handshake just authenticated, and the policy accepts that VatId.
    fn read_payload_and_authenticate(
        &mut self,
        msg: &[u8],
        during: &'static str,
    ) -> Result<(), Error> {
        let noise = self.noise.as_mut().expect("noise state");
        let mut buf = vec![0u8; msg.len()];
        let read = noise.read_message(msg, &mut buf);
        // Logged even if the peer is refused: the log is for looking at it.
        self.log_new_keys();
        let noise = self.noise.as_mut().expect("noise state");
        let n = read.map_err(|e| Error::from_snow(e, during))?;
        let rs: [u8; 32] = noise
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::BadIdentityProof("no Noise static key was received"))?;
        let (vat_id, signature) = payload::authenticate(&buf[..n], &rs)?;
        self.accept_peer(vat_id)?;
        self.peer = Some(vat_id);
        if self.role == Role::Initiator {
            let suite = self.suite.expect("suite known");
            self.learned = Some(Box::new(KnownResponder::verified(
                vat_id, rs, signature, suite,
            )));
        }
        Ok(())
    }

    /// The reflection check and the policy (SPEC.md 5.4), after the peer
    /// proved `vat_id`.
    fn accept_peer(&self, vat_id: VatId) -> Result<(), Error> {
        if vat_id == self.own && !self.config.allow_self {
            return Err(Error::PeerRefused {
                vat_id,
                reason: REFLECTED.into(),
            });
        }
        self.policy
            .check(&vat_id, &self.ctx)
            .map_err(|r| Error::PeerRefused {
                vat_id,
                reason: r.0,
            })
    }

    /// Whether this handshake's secrets go to the key log (if there is
    /// one): the format (SPEC.md appendix A) covers `XX` handshakes only,
    /// so nothing is logged of one that started with `IK` or fell back from
    /// it (section 14).
    fn logs_keys(&self) -> bool {
        self.pattern == Pattern::XX && !self.fell_back
    }

    /// Writes the handshake keys snow has been given since the last call to
    /// the key log, if there is one (labels in the order of XX's MixKeys).
    fn log_new_keys(&mut self) {
        if !self.logs_keys() {
            return;
        }
        let (Some(log), Some(k)) = (&self.config.key_log, &mut self.key_logging) else {
            return;
        };
        let Some(keys) = &k.recorder else { return };
        let Ok(keys) = keys.lock() else { return };
        let labels = [
            keylog::HANDSHAKE_KEY_EE,
            keylog::HANDSHAKE_KEY_ES,
            keylog::HANDSHAKE_KEY_SE,
        ];
        for (label, key) in labels.iter().zip(keys.iter()).skip(k.logged) {
            log.log(label, &k.initiator_ephemeral, &key[..]);
        }
        k.logged = keys.len().min(labels.len());
    }

    fn finish(&mut self) {
        let noise = self.noise.as_ref().expect("noise state");
        self.handshake_hash
            .copy_from_slice(&noise.get_handshake_hash()[..HANDSHAKE_HASH_LEN]);
        self.state = State::Done;
    }

    /// Turns the finished handshake into a transport [`Session`]. Peer bytes
    /// received after the last handshake message, and handshake output not
    /// yet sent, move into the session.
    ///
    /// # Errors
    /// The handshake's error if it failed, or [`Error::Misuse`] if it has not
    /// finished yet.
    pub fn into_session(self) -> Result<Session, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.state != State::Done {
            return Err(Error::Misuse(
                "into_session() called before the handshake finished",
            ));
        }
        let logs_keys = self.logs_keys();
        let mut noise = self.noise.expect("noise state");
        // Split() (Noise §5.2): the initiator sends with the first key.
        let (k1, k2) = noise.dangerously_get_raw_split();
        let (k1, k2) = (Zeroizing::new(k1), Zeroizing::new(k2));
        if let (Some(log), Some(k), true) = (&self.config.key_log, &self.key_logging, logs_keys) {
            log.log(
                keylog::INITIATOR_TRAFFIC_KEY,
                &k.initiator_ephemeral,
                &k1[..],
            );
            log.log(
                keylog::RESPONDER_TRAFFIC_KEY,
                &k.initiator_ephemeral,
                &k2[..],
            );
        }
        let keys = match self.role {
            Role::Initiator => (k1, k2),
            Role::Responder => (k2, k1),
        };
        let pending = self.output[self.output_pos..].to_vec();
        let mut session = Session::new(
            keys,
            super::transport::Established {
                role: self.role,
                suite: self.suite.expect("suite known"),
                peer: self.peer.expect("peer known"),
                handshake_hash: self.handshake_hash,
            },
            self.config.session,
            pending,
            self.input,
        );
        // Early data a responder took is the start of the stream it reads;
        // early data it did not take, the initiator sends now (SPEC.md 14.5).
        session.prepend_plaintext(&self.early_in);
        if let (Some(early), EarlyDataOutcome::Refused | EarlyDataOutcome::FellBack) =
            (&self.early, self.early_outcome)
        {
            let n = session.write(early.as_bytes())?;
            debug_assert_eq!(n, early.as_bytes().len(), "early data fits one frame");
            session.flush()?;
        }
        Ok(session)
    }
}

/// Splits the payload of `IK` message 1 into the identity payload and the
/// early data (SPEC.md 14.3).
fn split_ik_payload(p1: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let bad = |what: &str| Error::from(ProtocolError::BadPayload(format!("IK message 1: {what}")));
    let (len, rest) = p1
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("no identity length"))?;
    let len = u16::from_be_bytes(*len) as usize;
    if len > MAX_HANDSHAKE_PAYLOAD_LEN || len > rest.len() {
        return Err(bad("the identity length exceeds the payload"));
    }
    Ok(rest.split_at(len))
}

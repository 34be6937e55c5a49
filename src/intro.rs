//! Introductions: three-party handoff between vats, sans-IO.
//!
//! Bob holds a capability hosted by Carol and wants Alice to have it, with
//! Alice's calls going straight to Carol rather than through Bob:
//!
//! ```text
//!  Bob (introducer)                Carol (provider)               Alice (recipient)
//!    | -- ThirdPartyToAwait + cap --> |                                 |
//!    |      (Bob's authenticated      |  HandoffTable::expect           |
//!    |       connection to Carol)     |                                 |
//!    | -------------------- ThirdPartyToContact (signed Introduction) -> |
//!    |                                | <-- ThirdPartyCompletion ------- |
//!    |                                |  (Alice's own authenticated     |
//!    |                                |   connection to Carol)          |
//!    |                                |  HandoffTable::redeem -> cap    |
//! ```
//!
//! The three messages are the network types that Cap'n Proto's `rpc.capnp`
//! asks each vat network to define for level-3 handoff; `schema/network.capnp`
//! defines them for capnp-noise under the same names. SPEC.md section 12
//! specifies the protocol and its security argument; [`crate::network`]
//! runs it over capnp-rpc.
//!
//! This module is the sans-IO part: it never touches a socket or the clock
//! (time is passed in as `now`). A program on a [`Network`](crate::network::Network)
//! does not need it directly: [`Network::introduce`](crate::network::Network::introduce)
//! and [`Network::redeem`](crate::network::Network::redeem) do all of the
//! following, and the module docs of [`crate::network`] show them at work.
//!
//! * [`Introduction`]: built and signed by the introducer
//!   ([`Introduction::new`]), encoded as a `ThirdPartyToContact`
//!   ([`Introduction::encode`]) for the recipient, or as a
//!   `ThirdPartyCompletion` ([`Introduction::encode_completion`]) for the
//!   provider, decoded with fixed limits ([`Introduction::decode`]), and
//!   checked with [`Introduction::verify`].
//! * [`ThirdPartyToAwait`]: what the introducer sends the provider
//!   ([`Introduction::to_await`]).
//! * [`HandoffTable`]: the provider's table of capabilities set aside, with
//!   single use, expiry, revocation, the redeem-before-expect race and bounds.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use capnp_noise::intro::{random_nonce, HandoffTable, Introduction, Redeem, ThirdPartyToAwait};
//! use capnp_noise::Identity;
//! # fn main() -> capnp_noise::Result<()> {
//! let (alice, bob, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
//! let now = SystemTime::now();
//!
//! // Bob: sign an introduction of Carol's capability to Alice.
//! let intro = Introduction::new(
//!     &bob, carol.vat_id(), vec!["127.0.0.1:4000".parse()?], alice.vat_id(),
//!     random_nonce(), now + Duration::from_secs(300),
//! )?;
//! let for_carol: Vec<u8> = intro.to_await().encode();   // sent to Carol with the capability
//! let for_alice: Vec<u8> = intro.encode();              // sent to Alice
//!
//! // Carol: Bob (authenticated as bob.vat_id()) asks her to set the capability aside.
//! let mut table = HandoffTable::new(carol.vat_id(), Default::default());
//! table.expect(&bob.vat_id(), &ThirdPartyToAwait::decode(&for_carol)?, "the capability", now)?;
//!
//! // Alice: checks what she got, then presents it to Carol over her own connection.
//! let received = Introduction::decode(&for_alice)?;
//! received.verify(&alice.vat_id(), now)?;
//! let completion = received.encode_completion();
//!
//! // Carol: the authenticated caller is Alice.
//! let presented = Introduction::decode_completion(&completion)?;
//! match table.redeem(&alice.vat_id(), &presented, now)? {
//!     Redeem::Ready(cap) => assert_eq!(cap, "the capability"),
//!     Redeem::Pending(_) => unreachable!("Bob's request came first"),
//! }
//! // One use only.
//! assert!(table.redeem(&alice.vat_id(), &presented, now).is_err());
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capnp::message::{Builder, HeapAllocator, ReaderOptions, SegmentArray};
use capnp::serialize;
use capnp::Word;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Error, IntroductionError, Result};
use crate::identity::Identity;
use crate::schema::network_capnp::{
    introduction, third_party_completion, third_party_to_await, third_party_to_contact,
};
use crate::schema::noise_capnp::vat_id;
use crate::sturdy::{read_addresses, write_addresses, Address, MAX_ADDRESSES};
use crate::vat_id::VatId;

mod handoff;
pub use handoff::{HandoffConfig, HandoffTable, PendingRedeem, Redeem};

/// The domain-separation prefix of the introducer's signature.
pub const INTRODUCTION_CONTEXT: &[u8] = b"capnp-noise/v1 introduction:";
/// The domain-separation prefix of a forwarding link's signature.
pub const FORWARD_CONTEXT: &[u8] = b"capnp-noise/v1 forward:";
/// The length of a handoff nonce.
pub const NONCE_LEN: usize = 32;
/// The most forwarding links protocol version 1 accepts.
pub const MAX_FORWARDS: usize = 1;
/// The longest encoded `ThirdPartyToContact`, `ThirdPartyCompletion` or
/// `ThirdPartyToAwait` message accepted by the `decode` functions.
pub const MAX_ENCODED_LEN: usize = 8192;
/// The most words a `ThirdPartyToContact` struct may take, counting every
/// pointer target as often as it is pointed to (which is what a canonical
/// copy costs): as much as fits in [`MAX_ENCODED_LEN`] bytes. Checked before
/// anything is copied, canonicalised or hashed, so that a struct whose
/// pointers all share one blob (small on the wire, huge once copied) is
/// refused for what it would cost.
pub const MAX_CONTACT_WORDS: u64 = (MAX_ENCODED_LEN / 8) as u64;
/// The latest expiry an introduction may carry: 9999-12-31T23:59:59Z, in Unix seconds.
pub const MAX_EXPIRES_AT: u64 = 253_402_300_799;

/// A handoff nonce: 32 random bytes, unique among one introducer's handoffs.
pub type Nonce = [u8; NONCE_LEN];

/// Reading limits for untrusted introductions. Decoding reads every word about
/// three times (the size of the contact, then the size and the canonical copy
/// of the signed struct; the fields are read from the copy), hence four times
/// the largest message.
const READER_OPTIONS: ReaderOptions = ReaderOptions {
    traversal_limit_in_words: Some(4 * MAX_ENCODED_LEN / 8),
    nesting_limit: 8,
};

/// A fresh random nonce from the OS RNG.
pub fn random_nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// An introduction: "the introducer vouches that `recipient` may pick up,
/// once and before `expires_at`, the capability it set aside at `provider`
/// under `nonce`", signed by the introducer, with any forwarding links.
///
/// It is both rpc.capnp's `ThirdPartyToContact` (what the recipient gets) and
/// the content of its `ThirdPartyCompletion` (what the recipient presents).
/// Obtain one from [`Introduction::new`] (the introducer), a `decode`
/// function, [`Introduction::read_from`], or [`Introduction::forward`].
/// Decoding checks the structure only; [`Introduction::verify`] checks the
/// signatures, the expiry and who may use it.
#[derive(Clone, PartialEq, Eq)]
pub struct Introduction {
    provider: VatId,
    provider_addresses: Vec<Address>,
    introducer: VatId,
    recipient: VatId,
    nonce: Nonce,
    expires_at: u64,
    /// The canonical encoding of the signed `Introduction` struct (one
    /// segment, root pointer first), exactly as signed: unknown fields of
    /// later versions survive decoding and re-encoding.
    canonical: Arc<[u8]>,
    signature: [u8; 64],
    forwards: Vec<Forward>,
}

/// One forwarding link of an [`Introduction`]: the holder before it handed
/// the introduction on to [`Forward::to`], and signed that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    to: VatId,
    signature: [u8; 64],
}

impl Forward {
    /// The vat the introduction was forwarded to.
    pub fn to(&self) -> &VatId {
        &self.to
    }

    /// The previous holder's Ed25519 signature over this link.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
}

/// An [`Introduction`] whose signatures, expiry and final holder were
/// checked by [`Introduction::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedIntroduction(Introduction);

impl VerifiedIntroduction {
    /// The checked introduction.
    pub fn introduction(&self) -> &Introduction {
        &self.0
    }

    /// The checked introduction, by value.
    pub fn into_inner(self) -> Introduction {
        self.0
    }
}

/// What the introducer sends the provider, over their authenticated
/// connection and together with the capability: set it aside for
/// `recipient` under `nonce` until `expires_at`. rpc.capnp's
/// `ThirdPartyToAwait`; the introducer is the connection's authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThirdPartyToAwait {
    recipient: VatId,
    nonce: Nonce,
    expires_at: u64,
}

fn malformed(why: impl Into<String>) -> Error {
    Error::Introduction(IntroductionError::Malformed(why.into()))
}

/// Unix seconds of `t`, rounded down.
///
/// # Errors
/// [`Error::Misuse`] if `t` is before 1970 or after [`MAX_EXPIRES_AT`].
fn unix_secs(t: SystemTime) -> Result<u64> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Misuse("an expiry before 1970 cannot be encoded"))?
        .as_secs();
    if secs > MAX_EXPIRES_AT {
        return Err(Error::Misuse(
            "an expiry after the year 9999 (MAX_EXPIRES_AT) cannot be encoded",
        ));
    }
    Ok(secs)
}

/// The time `secs` seconds after the Unix epoch (at most [`MAX_EXPIRES_AT`],
/// which every platform's `SystemTime` represents).
fn time_of(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.min(MAX_EXPIRES_AT))
}

/// True once `now` has reached the expiry `expires_at` (Unix seconds).
fn is_expired(expires_at: u64, now: SystemTime) -> bool {
    now >= time_of(expires_at)
}

fn read_vat(has: bool, reader: capnp::Result<vat_id::Reader<'_>>, what: &str) -> Result<VatId> {
    if !has {
        return Err(malformed(format!("{what} is missing")));
    }
    VatId::read_capnp(reader).map_err(|e| malformed(format!("{what}: {e}")))
}

fn read_nonce(has: bool, data: capnp::Result<&[u8]>) -> Result<Nonce> {
    if !has {
        return Err(malformed("nonce is missing"));
    }
    let data = data.map_err(|e| malformed(format!("bad nonce: {e}")))?;
    data.try_into()
        .map_err(|_| malformed(format!("nonce has {} bytes, not {NONCE_LEN}", data.len())))
}

fn read_signature(data: capnp::Result<&[u8]>, what: &str) -> Result<[u8; 64]> {
    let data = data.map_err(|e| malformed(format!("bad {what}: {e}")))?;
    data.try_into()
        .map_err(|_| malformed(format!("{what} has {} bytes, not 64", data.len())))
}

fn read_expiry(secs: u64) -> Result<u64> {
    if secs > MAX_EXPIRES_AT {
        return Err(malformed(format!(
            "expiresAt {secs} is after {MAX_EXPIRES_AT} (year 9999)"
        )));
    }
    Ok(secs)
}

/// Reads one untrusted message of at most [`MAX_ENCODED_LEN`] bytes (standard
/// stream framing, unpacked, no trailing bytes) and hands it to `f`. The
/// bytes are copied into an aligned buffer, so any slice is accepted.
fn with_message<R>(
    bytes: &[u8],
    f: impl FnOnce(&capnp::message::Reader<serialize::BufferSegments<&[u8]>>) -> Result<R>,
) -> Result<R> {
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(malformed(format!(
            "{} bytes exceed the {MAX_ENCODED_LEN}-byte limit",
            bytes.len()
        )));
    }
    let mut words = Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    let mut slice = &Word::words_to_bytes(&words)[..bytes.len()];
    let message = serialize::read_message_from_flat_slice(&mut slice, READER_OPTIONS)
        .map_err(|e| malformed(format!("not a Cap'n Proto message: {e}")))?;
    if !slice.is_empty() {
        return Err(malformed("trailing bytes after the message"));
    }
    f(&message)
}

/// The canonical encoding of `reader` as the root of its own message: one
/// segment, starting with the root pointer, without a segment table.
fn canonical_bytes(reader: introduction::Reader<'_>) -> capnp::Result<Vec<u8>> {
    // The canonical form is never larger than the struct's total size, so one
    // first segment of that size holds it (set_root_canonical needs one segment).
    let words = reader.total_size()?.word_count + 1;
    let words = u32::try_from(words)
        .map_err(|_| capnp::Error::failed("introduction too large to canonicalize".into()))?;
    let mut message = Builder::new(HeapAllocator::new().first_segment_words(words));
    message.set_root_canonical(reader)?;
    let segments = message.get_segments_for_output();
    match &segments[..] {
        [only] => Ok(only.to_vec()),
        _ => Err(capnp::Error::failed(
            "canonical form spans several segments".into(),
        )),
    }
}

/// Hands `f` the `Introduction` struct of `canonical` (one segment, root
/// pointer first, as [`canonical_bytes`] makes it).
fn with_canonical<R>(
    canonical: &[u8],
    f: impl FnOnce(capnp::Result<introduction::Reader<'_>>) -> R,
) -> R {
    let mut words = Word::allocate_zeroed_vec(canonical.len().div_ceil(8));
    Word::words_to_bytes_mut(&mut words)[..canonical.len()].copy_from_slice(canonical);
    let segments = [Word::words_to_bytes(&words)];
    let segments = SegmentArray::new(&segments);
    let message = capnp::message::Reader::new(segments, READER_OPTIONS);
    f(message.get_root::<introduction::Reader>())
}

/// `INTRODUCTION_CONTEXT || canonical`: the bytes the introducer signs.
fn signing_message(canonical: &[u8]) -> Vec<u8> {
    [INTRODUCTION_CONTEXT, canonical].concat()
}

/// D_0 = SHA-256(INTRODUCTION_CONTEXT || canonical || signature).
fn root_digest(canonical: &[u8], signature: &[u8; 64]) -> [u8; 32] {
    Sha256::new()
        .chain_update(INTRODUCTION_CONTEXT)
        .chain_update(canonical)
        .chain_update(signature)
        .finalize()
        .into()
}

/// `FORWARD_CONTEXT || D_i || to`: the bytes the holder before link i signs.
fn forward_message(digest: &[u8; 32], to: &VatId) -> Vec<u8> {
    [FORWARD_CONTEXT, digest, to.as_bytes()].concat()
}

/// D_(i+1) = SHA-256(D_i || to_i || signature_i).
fn next_digest(digest: &[u8; 32], link: &Forward) -> [u8; 32] {
    Sha256::new()
        .chain_update(digest)
        .chain_update(link.to.as_bytes())
        .chain_update(link.signature)
        .finalize()
        .into()
}

impl Introduction {
    /// Builds and signs an introduction (the introducer's side).
    ///
    /// `introducer` signs; `provider` hosts the capability (reachable at
    /// `provider_addresses`, tried in order); `recipient` is the only vat
    /// that may redeem it; `nonce` must be fresh ([`random_nonce`]);
    /// `expires_at` is rounded down to whole seconds. The introducer must
    /// also ask the provider to expect it ([`Introduction::to_await`]).
    ///
    /// # Errors
    /// [`Error::Misuse`] if `expires_at` is before 1970 or after
    /// [`MAX_EXPIRES_AT`], or there are more than [`MAX_ADDRESSES`] addresses.
    pub fn new(
        introducer: &Identity,
        provider: VatId,
        provider_addresses: Vec<Address>,
        recipient: VatId,
        nonce: Nonce,
        expires_at: SystemTime,
    ) -> Result<Self> {
        let expires_at = unix_secs(expires_at)?;
        if provider_addresses.len() > MAX_ADDRESSES {
            return Err(Error::Misuse(
                "an introduction carries at most MAX_ADDRESSES provider addresses",
            ));
        }
        let mut message = Builder::new_default();
        {
            let mut b = message.init_root::<introduction::Builder>();
            b.reborrow()
                .init_provider()
                .set_ed25519(provider.as_bytes());
            write_addresses(
                b.reborrow()
                    .init_provider_addresses(provider_addresses.len() as u32),
                &provider_addresses,
            );
            b.reborrow()
                .init_introducer()
                .set_ed25519(introducer.vat_id().as_bytes());
            b.reborrow()
                .init_recipient()
                .set_ed25519(recipient.as_bytes());
            b.set_nonce(&nonce);
            b.set_expires_at(expires_at);
        }
        let canonical = message
            .get_root_as_reader::<introduction::Reader>()
            .and_then(canonical_bytes)
            .map_err(|source| Error::Rpc {
                during: "encoding of the introduction",
                source,
            })?;
        let signature = introducer.sign(&signing_message(&canonical));
        Ok(Introduction {
            provider,
            provider_addresses,
            introducer: introducer.vat_id(),
            recipient,
            nonce,
            expires_at,
            canonical: canonical.into(),
            signature,
            forwards: Vec::new(),
        })
    }

    /// The vat that hosts the capability (Carol).
    pub fn provider(&self) -> &VatId {
        &self.provider
    }

    /// Where to reach the provider, in order of preference.
    pub fn provider_addresses(&self) -> &[Address] {
        &self.provider_addresses
    }

    /// The vat that made and signed the introduction (Bob).
    pub fn introducer(&self) -> &VatId {
        &self.introducer
    }

    /// The vat the introduction was made for (Alice).
    pub fn recipient(&self) -> &VatId {
        &self.recipient
    }

    /// The vat that may redeem it now: the recipient, or the last vat it
    /// was forwarded to.
    pub fn holder(&self) -> &VatId {
        self.forwards.last().map_or(&self.recipient, |f| &f.to)
    }

    /// The handoff's nonce.
    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// When the introduction expires.
    pub fn expires_at(&self) -> SystemTime {
        time_of(self.expires_at)
    }

    /// When the introduction expires, in Unix seconds (as encoded).
    pub fn expires_at_unix(&self) -> u64 {
        self.expires_at
    }

    /// The forwarding links, oldest first.
    pub fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    /// The introducer's Ed25519 signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The bytes the introducer signed:
    /// [`INTRODUCTION_CONTEXT`] || canonical encoding of the `Introduction` struct.
    pub fn signed_message(&self) -> Vec<u8> {
        signing_message(&self.canonical)
    }

    /// What the introducer sends the provider: set the capability aside for
    /// the recipient, under this nonce, until this expiry.
    pub fn to_await(&self) -> ThirdPartyToAwait {
        ThirdPartyToAwait {
            recipient: self.recipient,
            nonce: self.nonce,
            expires_at: self.expires_at,
        }
    }

    /// Hands the introduction on to `to`: `holder` (the current
    /// [`holder`](Self::holder)) signs a forwarding link. The provider will
    /// then accept it only from `to`.
    ///
    /// # Errors
    /// [`Error::Misuse`] if `holder` is not the current holder;
    /// [`IntroductionError::Limit`] if the chain already has
    /// [`MAX_FORWARDS`] links.
    pub fn forward(&self, holder: &Identity, to: VatId) -> Result<Introduction> {
        if holder.vat_id() != *self.holder() {
            return Err(Error::Misuse(
                "only the current holder of an introduction can forward it",
            ));
        }
        if self.forwards.len() >= MAX_FORWARDS {
            return Err(Error::Introduction(IntroductionError::Limit(format!(
                "an introduction can be forwarded at most {MAX_FORWARDS} time(s)"
            ))));
        }
        let digest = self.chain_digest();
        let signature = holder.sign(&forward_message(&digest, &to));
        let mut next = self.clone();
        next.forwards.push(Forward { to, signature });
        Ok(next)
    }

    /// D_n: the digest after the last link.
    fn chain_digest(&self) -> [u8; 32] {
        self.forwards
            .iter()
            .fold(root_digest(&self.canonical, &self.signature), |d, f| {
                next_digest(&d, f)
            })
    }

    /// Checks the introduction as its holder or its provider must: the
    /// introducer's signature, every forwarding link's signature (each by
    /// the holder before it), the expiry against `now`, and that the final
    /// holder is `expected_holder` (the authenticated vat presenting it, or
    /// oneself on receipt).
    ///
    /// # Errors
    /// [`IntroductionError::BadSignature`] if a signature does not verify
    /// (the bytes were altered or forged); [`IntroductionError::Limit`] for
    /// a chain longer than [`MAX_FORWARDS`]; [`IntroductionError::Expired`]
    /// at or after the expiry; [`IntroductionError::WrongRecipient`] if the
    /// final holder is another vat.
    pub fn verify(&self, expected_holder: &VatId, now: SystemTime) -> Result<VerifiedIntroduction> {
        let refuse = |e| Err(Error::Introduction(e));
        if self
            .introducer
            .verify(&self.signed_message(), &self.signature)
            .is_err()
        {
            return refuse(IntroductionError::BadSignature(
                "the introducer's signature",
            ));
        }
        if self.forwards.len() > MAX_FORWARDS {
            return refuse(IntroductionError::Limit(format!(
                "{} forwarding links; at most {MAX_FORWARDS} are accepted",
                self.forwards.len()
            )));
        }
        let mut holder = self.recipient;
        let mut digest = root_digest(&self.canonical, &self.signature);
        for link in &self.forwards {
            if holder
                .verify(&forward_message(&digest, &link.to), &link.signature)
                .is_err()
            {
                return refuse(IntroductionError::BadSignature(
                    "a forwarding link's signature",
                ));
            }
            digest = next_digest(&digest, link);
            holder = link.to;
        }
        if is_expired(self.expires_at, now) {
            return refuse(IntroductionError::Expired);
        }
        if holder != *expected_holder {
            return refuse(IntroductionError::WrongRecipient);
        }
        Ok(VerifiedIntroduction(self.clone()))
    }

    /// Fills a `ThirdPartyToContact` struct of `schema/network.capnp`, for
    /// example a field of an RPC call's parameters.
    ///
    /// # Errors
    /// Only if the builder cannot allocate (capnp's error).
    pub fn write_to(&self, mut builder: third_party_to_contact::Builder<'_>) -> capnp::Result<()> {
        with_canonical(&self.canonical, |signed| builder.set_introduction(signed?))?;
        builder.set_signature(&self.signature);
        let mut list = builder.init_forwards(self.forwards.len() as u32);
        for (i, f) in self.forwards.iter().enumerate() {
            let mut link = list.reborrow().get(i as u32);
            link.reborrow().init_to().set_ed25519(f.to.as_bytes());
            link.set_signature(&f.signature);
        }
        Ok(())
    }

    /// Reads a `ThirdPartyToContact` struct of `schema/network.capnp`. The
    /// structure is checked; the signatures are not (see [`Introduction::verify`]).
    ///
    /// When the reader comes from a message read with generous limits (an
    /// RPC message), the field-by-field bounds here still cap the work.
    ///
    /// # Errors
    /// [`IntroductionError::Malformed`] naming the missing or malformed field
    /// (including more than [`MAX_FORWARDS`] links or [`MAX_ADDRESSES`] addresses).
    pub fn read_from(reader: third_party_to_contact::Reader<'_>) -> Result<Self> {
        // Sizing visits each pointer once and copies nothing; its cost is
        // bounded by the enclosing message's own traversal limit.
        let size = reader
            .total_size()
            .map_err(|e| malformed(format!("bad contact: {e}")))?;
        if size.word_count > MAX_CONTACT_WORDS {
            return Err(malformed(format!(
                "the contact takes {} words once shared pointers are expanded; at most {MAX_CONTACT_WORDS} are accepted",
                size.word_count
            )));
        }
        if !reader.has_introduction() {
            return Err(malformed("introduction is missing"));
        }
        let received = reader
            .get_introduction()
            .map_err(|e| malformed(format!("bad introduction: {e}")))?;
        let canonical = canonical_bytes(received)
            .map_err(|e| malformed(format!("cannot canonicalize the introduction: {e}")))?;
        // The fields are read from the canonical copy, which is what the
        // signature covers and what is passed on: a struct whose canonical
        // form reads differently (or not at all) is refused here, not later
        // by the provider.
        let (provider, provider_addresses, introducer, recipient, nonce, expires_at) =
            with_canonical(&canonical, |intro| {
                let intro = intro.map_err(|e| malformed(format!("bad introduction: {e}")))?;
                // Every field, unknown ones included, within the nesting limit.
                intro
                    .total_size()
                    .map_err(|e| malformed(format!("bad introduction: {e}")))?;
                Ok::<_, Error>((
                    read_vat(intro.has_provider(), intro.get_provider(), "provider")?,
                    read_addresses(intro.get_provider_addresses())
                        .map_err(|e| malformed(format!("providerAddresses: {e}")))?,
                    read_vat(intro.has_introducer(), intro.get_introducer(), "introducer")?,
                    read_vat(intro.has_recipient(), intro.get_recipient(), "recipient")?,
                    read_nonce(intro.has_nonce(), intro.get_nonce())?,
                    read_expiry(intro.get_expires_at())?,
                ))
            })?;
        let signature = read_signature(reader.get_signature(), "signature")?;
        let links = reader
            .get_forwards()
            .map_err(|e| malformed(format!("bad forwards: {e}")))?;
        if links.len() as usize > MAX_FORWARDS {
            return Err(malformed(format!(
                "{} forwarding links; version 1 accepts at most {MAX_FORWARDS}",
                links.len()
            )));
        }
        let forwards = links
            .iter()
            .map(|link| {
                Ok(Forward {
                    to: read_vat(link.has_to(), link.get_to(), "forward.to")?,
                    signature: read_signature(link.get_signature(), "forward.signature")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Introduction {
            provider,
            provider_addresses,
            introducer,
            recipient,
            nonce,
            expires_at,
            canonical: canonical.into(),
            signature,
            forwards,
        })
    }

    /// Encodes a message whose root is a `ThirdPartyToContact` (standard
    /// stream framing, unpacked): what the introducer gives the recipient.
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        self.write_to(message.init_root())
            .expect("re-encoding a canonical introduction cannot fail");
        serialize::write_message_to_words(&message)
    }

    /// Encodes a message whose root is a `ThirdPartyCompletion`: what the
    /// holder presents to the provider to redeem the introduction.
    pub fn encode_completion(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        self.write_to(
            message
                .init_root::<third_party_completion::Builder>()
                .init_contact(),
        )
        .expect("re-encoding a canonical introduction cannot fail");
        serialize::write_message_to_words(&message)
    }

    /// Decodes [`Introduction::encode`]'s output, from untrusted bytes: at
    /// most [`MAX_ENCODED_LEN`] bytes, fixed traversal and nesting limits,
    /// no trailing bytes. Never panics. The signatures are not checked
    /// here: call [`Introduction::verify`].
    ///
    /// # Errors
    /// [`IntroductionError::Malformed`] naming the problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        with_message(bytes, |m| {
            let root = m
                .get_root::<third_party_to_contact::Reader>()
                .map_err(|e| malformed(format!("bad root: {e}")))?;
            Self::read_from(root)
        })
    }

    /// Decodes [`Introduction::encode_completion`]'s output (the provider's
    /// side), with the same limits and guarantees as [`Introduction::decode`].
    ///
    /// # Errors
    /// [`IntroductionError::Malformed`] naming the problem.
    pub fn decode_completion(bytes: &[u8]) -> Result<Self> {
        with_message(bytes, |m| {
            let root = m
                .get_root::<third_party_completion::Reader>()
                .map_err(|e| malformed(format!("bad root: {e}")))?;
            if !root.has_contact() {
                return Err(malformed("contact is missing"));
            }
            let contact = root
                .get_contact()
                .map_err(|e| malformed(format!("bad contact: {e}")))?;
            Self::read_from(contact)
        })
    }
}

impl fmt::Debug for Introduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introduction")
            .field("provider", &self.provider.fingerprint())
            .field("introducer", &self.introducer.fingerprint())
            .field("recipient", &self.recipient.fingerprint())
            .field("holder", &self.holder().fingerprint())
            .field("expires_at", &self.expires_at)
            .field("forwards", &self.forwards.len())
            .finish_non_exhaustive()
    }
}

impl ThirdPartyToAwait {
    /// A request to set a capability aside for `recipient` under `nonce`
    /// until `expires_at` (rounded down to whole seconds). Usually obtained
    /// from [`Introduction::to_await`].
    ///
    /// # Errors
    /// [`Error::Misuse`] if `expires_at` is before 1970 or after [`MAX_EXPIRES_AT`].
    pub fn new(recipient: VatId, nonce: Nonce, expires_at: SystemTime) -> Result<Self> {
        Ok(ThirdPartyToAwait {
            recipient,
            nonce,
            expires_at: unix_secs(expires_at)?,
        })
    }

    /// The only vat that may redeem the handoff (or start its forwarding chain).
    pub fn recipient(&self) -> &VatId {
        &self.recipient
    }

    /// The handoff's nonce.
    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// When the provider drops the entry.
    pub fn expires_at(&self) -> SystemTime {
        time_of(self.expires_at)
    }

    /// Fills a `ThirdPartyToAwait` struct of `schema/network.capnp`.
    pub fn write_to(&self, mut builder: third_party_to_await::Builder<'_>) {
        builder
            .reborrow()
            .init_recipient()
            .set_ed25519(self.recipient.as_bytes());
        builder.set_nonce(&self.nonce);
        builder.set_expires_at(self.expires_at);
    }

    /// Reads a `ThirdPartyToAwait` struct of `schema/network.capnp`.
    ///
    /// # Errors
    /// [`IntroductionError::Malformed`] naming the missing or malformed field.
    pub fn read_from(reader: third_party_to_await::Reader<'_>) -> Result<Self> {
        Ok(ThirdPartyToAwait {
            recipient: read_vat(reader.has_recipient(), reader.get_recipient(), "recipient")?,
            nonce: read_nonce(reader.has_nonce(), reader.get_nonce())?,
            expires_at: read_expiry(reader.get_expires_at())?,
        })
    }

    /// Encodes a message whose root is a `ThirdPartyToAwait`.
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        self.write_to(message.init_root());
        serialize::write_message_to_words(&message)
    }

    /// Decodes [`ThirdPartyToAwait::encode`]'s output from untrusted bytes,
    /// with the same limits as [`Introduction::decode`]. Never panics.
    ///
    /// # Errors
    /// [`IntroductionError::Malformed`] naming the problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        with_message(bytes, |m| {
            let root = m
                .get_root::<third_party_to_await::Reader>()
                .map_err(|e| malformed(format!("bad root: {e}")))?;
            Self::read_from(root)
        })
    }
}

#[cfg(test)]
mod tests;

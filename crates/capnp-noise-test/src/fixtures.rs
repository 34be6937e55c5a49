//! Deterministic helpers for tests, test vectors, benchmarks and fuzzing.
//!
//! Only compiled with the `testing` feature (or in this crate's unit
//! tests). Fixed keys and ephemerals make every byte reproducible; never use
//! them outside tests.

use std::sync::Arc;

use capnp_noise::policy::{AnyVat, PeerContext, PeerPolicy};
use capnp_noise::wire::{Handshake, HandshakeConfig, Session, Suite};
use capnp_noise::{Error, Identity};

/// How many X25519 scalar multiplications (ephemeral key generation and
/// Diffie-Hellman, by capnp-noise's resolver) handshakes have run on the
/// calling thread since it started. A responder's completed handshake costs
/// 4 (3 to answer message 1, 1 for message 3); an initiator's 4 as well.
pub fn x25519_operations_on_this_thread() -> u64 {
    capnp_noise::wire::x25519_operations_on_this_thread()
}

/// What a real initiator with a fresh identity sends first: the preamble of
/// the preferred suite and message 1. Tests send it and then stall, to hold
/// a responder's handshake slot.
pub fn initiator_first_flight() -> Vec<u8> {
    Handshake::initiator(
        &Identity::generate(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        HandshakeConfig::default(),
    )
    .expect("the default config has suites")
    .pending_output()
    .to_vec()
}

/// The initiator's identity in test vectors: Ed25519 seed 0x01.., X25519 static 0x11...
pub fn initiator_identity() -> Identity {
    Identity::from_seed_and_static_key(&[0x01; 32], &[0x11; 32])
}

/// The responder's identity in test vectors: Ed25519 seed 0x02.., X25519 static 0x22...
pub fn responder_identity() -> Identity {
    Identity::from_seed_and_static_key(&[0x02; 32], &[0x22; 32])
}

/// The initiator's fixed ephemeral key in test vectors.
pub const INITIATOR_EPHEMERAL: [u8; 32] = [0x33; 32];
/// The responder's fixed ephemeral key in test vectors.
pub const RESPONDER_EPHEMERAL: [u8; 32] = [0x44; 32];

/// A deterministic initiator/responder pair for `suite`, not yet started.
///
/// # Errors
/// Only on configuration errors.
pub fn deterministic_handshakes(
    suite: Suite,
    config: HandshakeConfig,
    initiator_policy: Arc<dyn PeerPolicy>,
    responder_policy: Arc<dyn PeerPolicy>,
) -> Result<(Handshake, Handshake), Error> {
    let mut ic = config.clone();
    ic.suites = vec![suite];
    let i = Handshake::initiator_with_fixed_ephemeral(
        &initiator_identity(),
        initiator_policy,
        PeerContext::initiator(None, None),
        ic,
        INITIATOR_EPHEMERAL,
    )?;
    let r = Handshake::responder_with_fixed_ephemeral(
        &responder_identity(),
        responder_policy,
        PeerContext::responder(None),
        config,
        RESPONDER_EPHEMERAL,
    )?;
    Ok((i, r))
}

/// Runs two handshakes against each other in memory, moving at most `chunk`
/// bytes per step, until both finish or one fails.
///
/// # Errors
/// The first error either side reports.
pub fn drive(i: &mut Handshake, r: &mut Handshake, chunk: usize) -> Result<(), Error> {
    let chunk = chunk.max(1);
    for _ in 0..1_000_000 {
        if i.is_finished() && r.is_finished() && i.pending_output().is_empty() {
            return Ok(());
        }
        let moved = step(i, r, chunk)? | step(r, i, chunk)?;
        if !moved {
            if let Some(e) = i.error().or(r.error()) {
                return Err(e.clone());
            }
            if i.is_finished() && r.is_finished() {
                return Ok(());
            }
            return Err(Error::Config("handshake stalled".into()));
        }
    }
    Err(Error::Config("handshake did not converge".into()))
}

/// Moves up to `chunk` bytes of `from`'s output into `to`.
fn step(from: &mut Handshake, to: &mut Handshake, chunk: usize) -> Result<bool, Error> {
    let out = from.pending_output();
    if out.is_empty() || !to.wants_read() {
        return Ok(false);
    }
    let n = out.len().min(chunk);
    let bytes = out[..n].to_vec();
    let taken = to.feed(&bytes)?;
    from.consume_output(taken);
    Ok(taken > 0)
}

/// What the deterministic initiator records of the deterministic responder
/// after an XX handshake with `suite` (SPEC.md 14.1): what it resumes with.
///
/// # Panics
/// Never with these keys.
pub fn known_responder(suite: Suite) -> capnp_noise::wire::KnownResponder {
    let (mut i, mut r) = deterministic_handshakes(
        suite,
        HandshakeConfig::with_suite(suite),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .expect("deterministic handshakes");
    drive(&mut i, &mut r, usize::MAX).expect("handshake");
    i.learned_responder().expect("a finished initiator learned")
}

/// A finished, deterministic session pair (initiator, responder) accepting any vat.
///
/// # Errors
/// Only if the handshake fails, which it does not with these keys.
pub fn session_pair(suite: Suite, config: HandshakeConfig) -> Result<(Session, Session), Error> {
    let (mut i, mut r) =
        deterministic_handshakes(suite, config, Arc::new(AnyVat), Arc::new(AnyVat))?;
    drive(&mut i, &mut r, usize::MAX)?;
    Ok((i.into_session()?, r.into_session()?))
}

/// Moves all pending output of `from` into `to`, `chunk` bytes at a time,
/// reading plaintext out of `to` as it goes. Returns the plaintext, and
/// whether `to` saw the authenticated close.
///
/// # Errors
/// The receiver's error.
pub fn transfer(
    from: &mut Session,
    to: &mut Session,
    chunk: usize,
) -> Result<(Vec<u8>, bool), Error> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let chunk = chunk.max(1);
    loop {
        // Drain plaintext first so the receive buffer has room.
        loop {
            match to.read(&mut buf)? {
                capnp_noise::wire::ReadOutcome::Data(n) => got.extend_from_slice(&buf[..n]),
                capnp_noise::wire::ReadOutcome::Closed => return Ok((got, true)),
                capnp_noise::wire::ReadOutcome::NeedInput => break,
            }
        }
        let out = from.pending_output();
        if out.is_empty() {
            return Ok((got, false));
        }
        let n = out.len().min(chunk);
        let taken = to.feed(&out[..n]);
        from.consume_output(taken);
    }
}

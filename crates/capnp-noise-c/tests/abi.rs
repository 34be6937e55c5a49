//! The C ABI driven as a C program would: full handshakes and sessions
//! through the `cnoise_*` functions only, with raw pointers.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;

use capnp_noise_c::*;

fn last_error() -> String {
    // SAFETY: cnoise_last_error_message never returns null and the string
    // stays valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(cnoise_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn ok(status: CnoiseStatus) {
    assert_eq!(status, CnoiseStatus::Ok, "{}", last_error());
}

fn identity() -> *mut CnoiseIdentity {
    let mut id = ptr::null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cnoise_identity_generate(&mut id) });
    id
}

fn vat_id_of(id: *const CnoiseIdentity) -> String {
    let mut buf = [0 as c_char; CNOISE_VAT_ID_TEXT_SIZE];
    // SAFETY: a live identity and a buffer of the documented size.
    ok(unsafe { cnoise_identity_vat_id(id, buf.as_mut_ptr(), buf.len()) });
    // SAFETY: NUL-terminated by the call.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string()
}

fn pinned(vat: &str) -> *mut CnoisePolicy {
    let text = CString::new(vat).unwrap();
    let mut p = ptr::null_mut();
    // SAFETY: a NUL-terminated string and a valid out-pointer.
    ok(unsafe { cnoise_policy_pinned(text.as_ptr(), &mut p) });
    p
}

fn any() -> *mut CnoisePolicy {
    let mut p = ptr::null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cnoise_policy_any(&mut p) });
    p
}

fn handshake(
    id: *const CnoiseIdentity,
    policy: *const CnoisePolicy,
    initiator: bool,
) -> *mut CnoiseHandshake {
    let mut hs = ptr::null_mut();
    // SAFETY: live objects and a valid out-pointer.
    ok(unsafe {
        if initiator {
            cnoise_handshake_initiator(id, policy, &mut hs)
        } else {
            cnoise_handshake_responder(id, policy, &mut hs)
        }
    });
    hs
}

fn hs_output(hs: *mut CnoiseHandshake) -> Vec<u8> {
    let (mut data, mut len) = (ptr::null(), 0usize);
    // SAFETY: a live handshake and valid out-pointers; the bytes are copied
    // before the next call on the handshake.
    unsafe {
        ok(cnoise_handshake_pending_output(hs, &mut data, &mut len));
        let out = if len == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, len).to_vec()
        };
        ok(cnoise_handshake_consume_output(hs, len));
        out
    }
}

fn hs_feed(hs: *mut CnoiseHandshake, bytes: &[u8]) -> CnoiseStatus {
    let mut taken = 0;
    // SAFETY: a live handshake, a readable slice and a valid out-pointer.
    let status = unsafe { cnoise_handshake_feed(hs, bytes.as_ptr(), bytes.len(), &mut taken) };
    if status == CnoiseStatus::Ok {
        assert_eq!(taken, bytes.len());
    }
    status
}

/// Runs the handshake between two fresh handshakes in memory. Returns the
/// status of the first failure, or the two finished handshakes' sessions.
fn run_handshake(
    init: *mut CnoiseHandshake,
    resp: *mut CnoiseHandshake,
) -> Result<(*mut CnoiseSession, *mut CnoiseSession), (CnoiseStatus, Vec<u8>)> {
    let mut to_initiator_total = Vec::new();
    for _ in 0..4 {
        let out = hs_output(init);
        let s = hs_feed(resp, &out);
        if s != CnoiseStatus::Ok {
            return Err((s, out));
        }
        let back = hs_output(resp);
        to_initiator_total.extend_from_slice(&back);
        let s = hs_feed(init, &back);
        if s != CnoiseStatus::Ok {
            // What the initiator would send after a refusal.
            return Err((s, hs_output(init)));
        }
        // SAFETY: live handshakes.
        if unsafe { cnoise_handshake_is_finished(init) && cnoise_handshake_is_finished(resp) } {
            break;
        }
    }
    let (mut a, mut b) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: finished handshakes, consumed here; valid out-pointers.
    unsafe {
        ok(cnoise_handshake_into_session(init, &mut a));
        ok(cnoise_handshake_into_session(resp, &mut b));
    }
    Ok((a, b))
}

/// Moves every pending byte of `from` into `to`.
fn pump(from: *mut CnoiseSession, to: *mut CnoiseSession) {
    loop {
        let (mut data, mut len) = (ptr::null(), 0usize);
        // SAFETY: live sessions; the pending bytes are used before the next call on `from`.
        unsafe {
            ok(cnoise_session_pending_output(from, &mut data, &mut len));
            if len == 0 {
                return;
            }
            let bytes = std::slice::from_raw_parts(data, len);
            let mut taken = 0;
            ok(cnoise_session_feed(
                to,
                bytes.as_ptr(),
                bytes.len(),
                &mut taken,
            ));
            ok(cnoise_session_consume_output(from, taken));
            if taken < len {
                return; // the receiver must read first
            }
        }
    }
}

/// Reads everything readable from `s`: (data, closed).
fn read_all(s: *mut CnoiseSession) -> Result<(Vec<u8>, bool), CnoiseStatus> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 7000];
    loop {
        let (mut outcome, mut n) = (CnoiseReadOutcome::NeedInput, 0usize);
        // SAFETY: a live session, a writable buffer and valid out-pointers.
        let status =
            unsafe { cnoise_session_read(s, buf.as_mut_ptr(), buf.len(), &mut outcome, &mut n) };
        if status != CnoiseStatus::Ok {
            return Err(status);
        }
        match outcome {
            CnoiseReadOutcome::Data => got.extend_from_slice(&buf[..n]),
            CnoiseReadOutcome::Closed => return Ok((got, true)),
            CnoiseReadOutcome::NeedInput => return Ok((got, false)),
        }
    }
}

fn write_all(
    s: *mut CnoiseSession,
    peer: *mut CnoiseSession,
    mut data: &[u8],
    received: &mut Vec<u8>,
) {
    while !data.is_empty() {
        let mut accepted = 0;
        // SAFETY: a live session, a readable slice and a valid out-pointer.
        ok(unsafe { cnoise_session_write(s, data.as_ptr(), data.len(), &mut accepted) });
        data = &data[accepted..];
        pump(s, peer);
        received.extend(read_all(peer).unwrap().0);
        pump(s, peer);
    }
    // SAFETY: a live session.
    ok(unsafe { cnoise_session_flush(s) });
    while {
        pump(s, peer);
        let (more, _) = read_all(peer).unwrap();
        let progressed = !more.is_empty();
        received.extend(more);
        progressed
    } {}
}

#[test]
fn full_session_through_the_c_abi() {
    let (alice, bob) = (identity(), identity());
    let bob_vat = vat_id_of(bob);
    let alice_vat = vat_id_of(alice);
    let (to_bob, anyone) = (pinned(&bob_vat), any());
    let init = handshake(alice, to_bob, true);
    let resp = handshake(bob, anyone, false);
    // Policies and identities may be freed once the handshakes exist.
    // SAFETY: live objects, freed once.
    unsafe {
        cnoise_policy_free(to_bob);
        cnoise_policy_free(anyone);
    }
    let (a, b) =
        run_handshake(init, resp).unwrap_or_else(|(s, _)| panic!("{s:?}: {}", last_error()));

    // Each side sees the other's VatId, and both hold the same handshake hash.
    let mut buf = [0 as c_char; CNOISE_VAT_ID_TEXT_SIZE];
    let (mut ha, mut hb) = ([0u8; 32], [1u8; 32]);
    // SAFETY: live sessions and buffers of the documented sizes.
    unsafe {
        ok(cnoise_session_peer_vat_id(a, buf.as_mut_ptr(), buf.len()));
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), bob_vat);
        ok(cnoise_session_peer_vat_id(b, buf.as_mut_ptr(), buf.len()));
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), alice_vat);
        ok(cnoise_session_handshake_hash(a, ha.as_mut_ptr()));
        ok(cnoise_session_handshake_hash(b, hb.as_mut_ptr()));
    }
    assert_eq!(ha, hb);

    // 1 MiB each way, with a rekey in the middle of one direction.
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut at_b = Vec::new();
    write_all(a, b, &big[..300_000], &mut at_b);
    // SAFETY: a live session.
    ok(unsafe { cnoise_session_rekey(a) });
    write_all(a, b, &big[300_000..], &mut at_b);
    assert!(
        at_b == big,
        "the responder received {} bytes, not the same 1 MiB",
        at_b.len()
    );
    let mut at_a = Vec::new();
    write_all(b, a, &big, &mut at_a);
    assert!(at_a == big);

    // The authenticated close: the peer reads a clean end, then answers.
    // SAFETY: live sessions.
    unsafe {
        ok(cnoise_session_close(a));
        pump(a, b);
        let (rest, closed) = read_all(b).unwrap();
        assert!(rest.is_empty() && closed);
        assert!(cnoise_session_peer_closed(b));
        let mut accepted = 0;
        assert_eq!(
            cnoise_session_write(a, b"x".as_ptr(), 1, &mut accepted),
            CnoiseStatus::SendAfterClose
        );
        ok(cnoise_session_close(b));
        pump(b, a);
        ok(cnoise_session_feed_eof(a));
        assert_eq!(read_all(a).unwrap(), (Vec::new(), true));
        cnoise_session_free(a);
        cnoise_session_free(b);
        cnoise_identity_free(alice);
        cnoise_identity_free(bob);
    }
}

#[test]
fn wrong_pin_is_refused_before_the_initiator_reveals_itself() {
    let (alice, bob, mallory) = (identity(), identity(), identity());
    let to_bob = pinned(&vat_id_of(bob));
    let anyone = any();
    let init = handshake(alice, to_bob, true);
    let resp = handshake(mallory, anyone, false);
    let (status, after) = run_handshake(init, resp).map(|_| ()).unwrap_err();
    assert_eq!(status, CnoiseStatus::PeerRefused);
    assert!(last_error().contains("refused"), "{}", last_error());
    // Message 3 (the initiator's identity) was never produced.
    assert!(
        after.is_empty(),
        "the initiator still had {} bytes to send",
        after.len()
    );
    let mut s = ptr::null_mut();
    // SAFETY: the failed handshakes are consumed (initiator) or freed (responder) once.
    unsafe {
        assert_eq!(
            cnoise_handshake_into_session(init, &mut s),
            CnoiseStatus::PeerRefused
        );
        assert!(s.is_null());
        cnoise_handshake_free(resp);
        cnoise_policy_free(to_bob);
        cnoise_policy_free(anyone);
        for id in [alice, bob, mallory] {
            cnoise_identity_free(id);
        }
    }
}

unsafe extern "C" fn accept_only(user: *mut c_void, peer: *const c_char) -> bool {
    // SAFETY: the test passes a pointer to a live String as user data, and
    // the library a NUL-terminated VatId.
    unsafe {
        let wanted = &*(user as *const String);
        CStr::from_ptr(peer).to_str().unwrap() == wanted
    }
}

#[test]
fn callback_and_allow_list_policies_decide() {
    let (alice, bob, carol) = (identity(), identity(), identity());
    let alice_vat = vat_id_of(alice);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("allow");
    std::fs::write(&list, format!("# friends\n{alice_vat} alice\n")).unwrap();
    let list_c = CString::new(list.to_str().unwrap()).unwrap();
    let wanted = alice_vat.clone();
    for use_callback in [false, true] {
        let mut policy = ptr::null_mut();
        // SAFETY: valid strings, callback and out-pointer; `wanted` outlives the policy.
        ok(unsafe {
            if use_callback {
                cnoise_policy_callback(
                    Some(accept_only),
                    &wanted as *const String as *mut c_void,
                    &mut policy,
                )
            } else {
                cnoise_policy_allow_list_file(list_c.as_ptr(), &mut policy)
            }
        });
        let anyone = any();
        // Alice is accepted by the responder...
        let r = run_handshake(
            handshake(alice, anyone, true),
            handshake(bob, policy, false),
        );
        let (a, b) = r.unwrap_or_else(|(s, _)| panic!("{s:?}: {}", last_error()));
        // ...Carol is refused, after message 3.
        let resp = handshake(bob, policy, false);
        let init = handshake(carol, anyone, true);
        let (status, _) = run_handshake(init, resp).map(|_| ()).unwrap_err();
        assert_eq!(
            status,
            CnoiseStatus::PeerRefused,
            "callback: {use_callback}"
        );
        // SAFETY: objects freed once.
        unsafe {
            cnoise_session_free(a);
            cnoise_session_free(b);
            cnoise_handshake_free(init);
            cnoise_handshake_free(resp);
            cnoise_policy_free(policy);
            cnoise_policy_free(anyone);
        }
    }
    // SAFETY: objects freed once.
    unsafe {
        for id in [alice, bob, carol] {
            cnoise_identity_free(id);
        }
    }
}

#[test]
fn truncation_is_an_error_never_a_clean_end() {
    let (alice, bob) = (identity(), identity());
    let anyone = any();
    let (a, b) = run_handshake(
        handshake(alice, anyone, true),
        handshake(bob, anyone, false),
    )
    .unwrap_or_else(|(s, _)| panic!("{s:?}"));
    let mut accepted = 0;
    // SAFETY: live sessions and valid pointers.
    unsafe {
        ok(cnoise_session_write(a, b"hello".as_ptr(), 5, &mut accepted));
        ok(cnoise_session_flush(a));
        // Only part of the frame arrives, then the stream ends.
        let (mut data, mut len) = (ptr::null(), 0usize);
        ok(cnoise_session_pending_output(a, &mut data, &mut len));
        let mut taken = 0;
        ok(cnoise_session_feed(b, data, len - 3, &mut taken));
        ok(cnoise_session_feed_eof(b));
        assert_eq!(read_all(b), Err(CnoiseStatus::UnexpectedEof));
        assert!(last_error().contains("truncated"), "{}", last_error());
        // Sticky.
        assert_eq!(read_all(b), Err(CnoiseStatus::UnexpectedEof));
        cnoise_session_free(a);
        cnoise_session_free(b);
        cnoise_policy_free(anyone);
        cnoise_identity_free(alice);
        cnoise_identity_free(bob);
    }
}

#[test]
fn identities_round_trip_through_key_files_and_vat_id_text() {
    let id = identity();
    let vat = vat_id_of(id);
    let dir = tempfile::tempdir().unwrap();
    let path = CString::new(dir.path().join("key.pem").to_str().unwrap()).unwrap();
    let mut loaded = ptr::null_mut();
    let mut key = [0u8; 32];
    let mut text = [0 as c_char; CNOISE_VAT_ID_TEXT_SIZE];
    // SAFETY: live objects, NUL-terminated strings, buffers of the documented sizes.
    unsafe {
        ok(cnoise_identity_save(id, path.as_ptr(), false));
        assert_eq!(
            cnoise_identity_save(id, path.as_ptr(), false),
            CnoiseStatus::Key
        );
        ok(cnoise_identity_load(path.as_ptr(), &mut loaded));
        assert_eq!(vat_id_of(loaded), vat);
        // The CLI reads the same file.
        let cli = capnp_noise::Identity::load(dir.path().join("key.pem")).unwrap();
        assert_eq!(cli.vat_id().to_string(), vat);

        let vat_c = CString::new(vat.clone()).unwrap();
        ok(cnoise_vat_id_parse(vat_c.as_ptr(), key.as_mut_ptr()));
        ok(cnoise_vat_id_format(
            key.as_ptr(),
            text.as_mut_ptr(),
            text.len(),
        ));
        assert_eq!(CStr::from_ptr(text.as_ptr()).to_str().unwrap(), vat);
        // One character changed in the middle: the check characters catch it.
        let mut typo = vat.clone().into_bytes();
        typo[20] = if typo[20] == b'q' { b'r' } else { b'q' };
        let typo = CString::new(typo).unwrap();
        assert_eq!(
            cnoise_vat_id_parse(typo.as_ptr(), ptr::null_mut()),
            CnoiseStatus::Key
        );
        assert!(last_error().contains("check"), "{}", last_error());
        // A buffer one byte short is refused, not overrun.
        assert_eq!(
            cnoise_identity_vat_id(id, text.as_mut_ptr(), CNOISE_VAT_ID_TEXT_SIZE - 1),
            CnoiseStatus::InvalidArgument
        );
        cnoise_identity_free(id);
        cnoise_identity_free(loaded);
    }
}

#[test]
fn null_pointers_are_refused_not_dereferenced() {
    let mut taken = 0;
    let mut hs = ptr::null_mut();
    // SAFETY: every pointer is null or valid; null is what is being tested.
    unsafe {
        assert_eq!(
            cnoise_identity_generate(ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_identity_load(ptr::null(), ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_policy_pinned(ptr::null(), ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_policy_callback(None, ptr::null_mut(), ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_handshake_initiator(ptr::null(), ptr::null(), &mut hs),
            CnoiseStatus::InvalidArgument
        );
        assert!(
            last_error().contains("identity is null"),
            "{}",
            last_error()
        );
        assert_eq!(
            cnoise_handshake_feed(ptr::null_mut(), ptr::null(), 0, &mut taken),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_handshake_require_admission(ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert_eq!(
            cnoise_handshake_admit(ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert!(!cnoise_handshake_received_message_1(ptr::null()));
        let id = identity();
        let anyone = any();
        let resp = handshake(id, anyone, false);
        // A null data pointer with a length is refused.
        assert_eq!(
            cnoise_handshake_feed(resp, ptr::null(), 10, &mut taken),
            CnoiseStatus::InvalidArgument
        );
        // An unfinished handshake does not become a session (and is consumed).
        let mut s = ptr::null_mut();
        assert_eq!(
            cnoise_handshake_into_session(resp, &mut s),
            CnoiseStatus::InvalidArgument
        );
        assert!(s.is_null());
        assert_eq!(
            cnoise_session_flush(ptr::null_mut()),
            CnoiseStatus::InvalidArgument
        );
        assert!(!cnoise_session_peer_closed(ptr::null()));
        cnoise_session_free(ptr::null_mut());
        cnoise_policy_free(anyone);
        cnoise_identity_free(id);
    }
}

/// SPEC.md 8.1 through the ABI: a responder that requires admission takes
/// the preamble and message 1, keeps what follows, and answers (message 2)
/// only once admitted; an initiator cannot be admitted.
#[test]
fn a_responder_answers_message_1_only_once_admitted() {
    let (alice, bob) = (identity(), identity());
    let anyone = any();
    let init = handshake(alice, anyone, true);
    let resp = handshake(bob, anyone, false);
    // SAFETY: live handshakes, readable slices and valid out-pointers.
    unsafe {
        ok(cnoise_handshake_require_admission(resp));
        assert!(!cnoise_handshake_received_message_1(resp));
        let mut first = hs_output(init);
        let msg1_len = first.len();
        first.extend_from_slice(b"early");
        let mut taken = 0;
        ok(cnoise_handshake_feed(
            resp,
            first.as_ptr(),
            first.len(),
            &mut taken,
        ));
        assert_eq!(
            taken, msg1_len,
            "nothing after message 1 is taken before admission"
        );
        assert!(cnoise_handshake_received_message_1(resp));
        assert!(cnoise_handshake_awaits_admission(resp));
        assert!(hs_output(resp).is_empty(), "message 2 before admission");
        ok(cnoise_handshake_admit(resp));
        assert!(!cnoise_handshake_awaits_admission(resp));
        let msg2 = hs_output(resp);
        assert!(!msg2.is_empty());
        // Admitting twice, or an initiator, is a misuse.
        assert_eq!(cnoise_handshake_admit(resp), CnoiseStatus::InvalidArgument);
        assert_eq!(cnoise_handshake_admit(init), CnoiseStatus::InvalidArgument);
        assert!(
            last_error().contains("not waiting for admission"),
            "{}",
            last_error()
        );
        // The handshake then completes as usual.
        ok(hs_feed(init, &msg2));
        ok(hs_feed(resp, &hs_output(init)));
        assert!(cnoise_handshake_is_finished(init) && cnoise_handshake_is_finished(resp));
        assert!(!cnoise_handshake_awaits_admission(ptr::null()));
        cnoise_handshake_free(init);
        cnoise_handshake_free(resp);
        cnoise_policy_free(anyone);
        cnoise_identity_free(alice);
        cnoise_identity_free(bob);
    }
}

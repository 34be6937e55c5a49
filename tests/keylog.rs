//! The key log (src/keylog.rs, SPEC.md appendix A): what it writes lets an
//! independent computation (RustCrypto's AEADs and hashes here, neither snow
//! nor aws-lc) decrypt a recorded session: both handshake payloads and every
//! transport frame both ways, across rekeys. It is off by default, its file
//! is created 0600, and the library ignores the environment variable.

use std::sync::Arc;

use aes_gcm::aead::{KeyInit, Payload};
use capnp_noise::keylog::{self, KeyLogFile, KEYLOG_ENV};
use capnp_noise::policy::AnyVat;
use capnp_noise::wire::{payload, HandshakeConfig, Suite};
use capnp_noise_test::capture::{
    record_session as record, KeyLogLines as Lines, Recorded as Recording,
};
use sha2::Digest;

// ---- An independent reader of the key log and the wire ----

/// The keys of one session, read from key log lines by hand.
#[derive(Default, Debug)]
struct Keys {
    ee: Option<[u8; 32]>,
    es: Option<[u8; 32]>,
    se: Option<[u8; 32]>,
    i2r: Option<[u8; 32]>,
    r2i: Option<[u8; 32]>,
}

fn keys_for(lines: &[String], initiator_ephemeral: &[u8]) -> Keys {
    let mut keys = Keys::default();
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "{line}");
        assert_eq!(fields[1].len(), 64);
        if hex::decode(fields[1]).unwrap() != initiator_ephemeral {
            continue;
        }
        let key: [u8; 32] = hex::decode(fields[2]).unwrap().try_into().unwrap();
        let slot = match fields[0] {
            "HANDSHAKE_KEY_EE" => &mut keys.ee,
            "HANDSHAKE_KEY_ES" => &mut keys.es,
            "HANDSHAKE_KEY_SE" => &mut keys.se,
            "INITIATOR_TRAFFIC_KEY" => &mut keys.i2r,
            "RESPONDER_TRAFFIC_KEY" => &mut keys.r2i,
            other => panic!("unknown label {other}"),
        };
        assert!(slot.replace(key).is_none(), "{} twice", fields[0]);
    }
    keys
}

fn hash(suite: Suite, parts: &[&[u8]]) -> [u8; 32] {
    match suite {
        Suite::AesGcmSha256 => {
            let mut h = sha2::Sha256::new();
            parts.iter().for_each(|p| h.update(p));
            h.finalize().into()
        }
        _ => {
            let mut h = blake2::Blake2s256::new();
            parts.iter().for_each(|p| h.update(p));
            h.finalize().into()
        }
    }
}

/// Noise's AEAD with its nonce encoding: 4 zero bytes, then the counter
/// (big-endian for AES-GCM, little-endian for ChaCha20-Poly1305).
fn aead(
    suite: Suite,
    key: &[u8; 32],
    n: u64,
    ad: &[u8],
    data: &[u8],
    seal: bool,
) -> Option<Vec<u8>> {
    let mut nonce = [0u8; 12];
    let payload = Payload { msg: data, aad: ad };
    fn run<C: aes_gcm::aead::Aead>(
        c: C,
        nonce: [u8; 12],
        p: Payload,
        seal: bool,
    ) -> Option<Vec<u8>> {
        let nonce = aes_gcm::aead::generic_array::GenericArray::from_slice(&nonce);
        if seal {
            c.encrypt(nonce, p).ok()
        } else {
            c.decrypt(nonce, p).ok()
        }
    }
    match suite {
        Suite::AesGcmSha256 => {
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            run(
                aes_gcm::Aes256Gcm::new_from_slice(key).unwrap(),
                nonce,
                payload,
                seal,
            )
        }
        _ => {
            nonce[4..].copy_from_slice(&n.to_le_bytes());
            let c = chacha20poly1305::ChaCha20Poly1305::new_from_slice(key).unwrap();
            run(c, nonce, payload, seal)
        }
    }
}

fn take_frame(wire: &mut &[u8]) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([wire[0], wire[1]]));
    let body = wire[2..2 + len].to_vec();
    *wire = &wire[2 + len..];
    body
}

/// What the independent reader found in a recording.
struct Decoded {
    responder_static: Vec<u8>,
    initiator_static: Vec<u8>,
    payload_r: Vec<u8>,
    payload_i: Vec<u8>,
    handshake_hash: [u8; 32],
    i2r_data: Vec<u8>,
    r2i_data: Vec<u8>,
    i2r_rekeys: usize,
    r2i_rekeys: usize,
}

/// Decrypts the frames of one direction: returns the DATA bytes and how
/// many REKEYs it followed (Noise `Rekey()`: the first 32 bytes of
/// ENCRYPT(k, 2^64-1, empty, 32 zero bytes)), checking it ends with CLOSE.
fn transport(suite: Suite, mut key: [u8; 32], mut wire: &[u8]) -> (Vec<u8>, usize) {
    let (mut data, mut rekeys, mut n) = (Vec::new(), 0, 0u64);
    let mut closed = false;
    while !wire.is_empty() {
        let frame = take_frame(&mut wire);
        let plain = aead(suite, &key, n, &[], &frame, false).expect("frame decrypts");
        n += 1;
        let (ty, body) = plain.split_last().unwrap();
        match ty {
            0 => data.extend_from_slice(body),
            1 => closed = true,
            2 => {
                let k = aead(suite, &key, u64::MAX, &[], &[0; 32], true).unwrap();
                key.copy_from_slice(&k[..32]);
                rekeys += 1;
            }
            t => panic!("frame type {t}"),
        }
    }
    assert!(closed, "the direction ends with CLOSE");
    (data, rekeys)
}

fn decode(suite: Suite, rec: &Recording, lines: &[String]) -> Decoded {
    // Preamble: magic, version, name_len, name. It is the prologue.
    let name_len = usize::from(rec.i2r[12]);
    let (prologue, mut i2r) = rec.i2r.split_at(13 + name_len);
    let name = &prologue[13..];
    assert_eq!(name, suite.noise_name().as_bytes());
    let mut r2i = &rec.r2i[..];
    // h starts as the protocol name, zero-padded, or its hash if longer than 32.
    let mut h = [0u8; 32];
    if name.len() <= 32 {
        h[..name.len()].copy_from_slice(name);
    } else {
        h = hash(suite, &[name]);
    }
    let mix = |h: &mut [u8; 32], data: &[u8]| *h = hash(suite, &[&h[..], data]);
    mix(&mut h, prologue);
    let msg1 = take_frame(&mut i2r);
    assert_eq!(msg1.len(), 32);
    let keys = keys_for(lines, &msg1);
    mix(&mut h, &msg1); // e
    mix(&mut h, &[]); // message 1's empty payload, in clear
    let msg2 = take_frame(&mut r2i);
    mix(&mut h, &msg2[..32]); // responder's e
    let enc_s = &msg2[32..80];
    let responder_static = aead(suite, &keys.ee.unwrap(), 0, &h, enc_s, false).expect("s_r");
    mix(&mut h, enc_s);
    let enc_p = &msg2[80..];
    let payload_r = aead(suite, &keys.es.unwrap(), 0, &h, enc_p, false).expect("payload_R");
    mix(&mut h, enc_p);
    let msg3 = take_frame(&mut i2r);
    let enc_s = &msg3[..48];
    let initiator_static = aead(suite, &keys.es.unwrap(), 1, &h, enc_s, false).expect("s_i");
    mix(&mut h, enc_s);
    let enc_p = &msg3[48..];
    let payload_i = aead(suite, &keys.se.unwrap(), 0, &h, enc_p, false).expect("payload_I");
    mix(&mut h, enc_p);
    let (i2r_data, i2r_rekeys) = transport(suite, keys.i2r.unwrap(), i2r);
    let (r2i_data, r2i_rekeys) = transport(suite, keys.r2i.unwrap(), r2i);
    Decoded {
        responder_static,
        initiator_static,
        payload_r,
        payload_i,
        handshake_hash: h,
        i2r_data,
        r2i_data,
        i2r_rekeys,
        r2i_rekeys,
    }
}

/// With the key log on at both ends, its lines decrypt the handshake
/// payloads (both VatIds, valid signatures), reproduce the handshake hash,
/// and decrypt every frame both ways across rekeys; both ends log the same
/// five lines.
#[test]
fn key_log_lines_decrypt_a_recorded_session() {
    for suite in Suite::ALL {
        let (li, lr) = (Arc::new(Lines::default()), Arc::new(Lines::default()));
        let rec = record(
            suite,
            HandshakeConfig::default().with_key_log(Some(li.clone())),
            HandshakeConfig::default().with_key_log(Some(lr.clone())),
        );
        let (li, lr) = (li.lines(), lr.lines());
        assert_eq!(li.len(), 5, "{li:?}");
        assert_eq!(li, lr, "initiator and responder log the same lines");
        let labels: Vec<&str> = li.iter().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(labels, keylog::LABELS);

        // Each end's log alone decrypts everything.
        for lines in [&li, &lr] {
            let d = decode(suite, &rec, lines);
            assert_eq!(d.responder_static, rec.responder.noise_static_public());
            assert_eq!(d.initiator_static, rec.initiator.noise_static_public());
            let (vat_r, sig_r) = payload::decode(&d.payload_r).unwrap();
            assert_eq!(vat_r, rec.responder.vat_id());
            let rs: [u8; 32] = d.responder_static.clone().try_into().unwrap();
            payload::verify_binding(&vat_r, &sig_r, &rs).expect("responder's signature");
            let (vat_i, _) = payload::decode(&d.payload_i).unwrap();
            assert_eq!(vat_i, rec.initiator.vat_id());
            assert_eq!(d.handshake_hash, rec.handshake_hash, "h from public data");
            assert_eq!(d.i2r_data, rec.sent_i2r);
            assert_eq!(d.r2i_data, rec.sent_r2i);
            assert!(d.i2r_rekeys >= 2, "{} rekeys", d.i2r_rekeys);
            assert!(d.r2i_rekeys >= 2, "{} rekeys", d.r2i_rekeys);
        }
    }
}

/// Only one end logging is enough (a researcher may control one side).
#[test]
fn one_end_alone_logs_every_key() {
    let lr = Arc::new(Lines::default());
    let suite = Suite::MANDATORY;
    let rec = record(
        suite,
        HandshakeConfig::default(),
        HandshakeConfig::default().with_key_log(Some(lr.clone())),
    );
    let lines = lr.lines();
    let d = decode(suite, &rec, &lines);
    assert_eq!(d.i2r_data, rec.sent_i2r);
}

/// Off by default: the default config has no key log, and with the
/// environment variable set a session through the library's API creates
/// no file (only the CLI and the examples read it).
#[test]
fn off_by_default_and_the_environment_is_ignored() {
    assert!(HandshakeConfig::default().key_log.is_none());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.log");
    // This test binary's only reader of the environment is the library.
    std::env::set_var(KEYLOG_ENV, &path);
    let rec = record(
        Suite::MANDATORY,
        HandshakeConfig::default(),
        HandshakeConfig::default(),
    );
    std::env::remove_var(KEYLOG_ENV);
    assert!(!rec.i2r.is_empty());
    assert!(!path.exists(), "the library honoured {KEYLOG_ENV}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A `KeyLogFile` is created 0600, appends, and a session writes its five
/// lines to it, which parse.
#[test]
fn key_log_file_is_private_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.log");
    let file = Arc::new(KeyLogFile::create(&path).unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    record(
        Suite::MANDATORY,
        HandshakeConfig::default().with_key_log(Some(file.clone())),
        HandshakeConfig::default(),
    );
    drop(file);
    let again = Arc::new(KeyLogFile::create(&path).unwrap());
    record(
        Suite::MANDATORY,
        HandshakeConfig::default(),
        HandshakeConfig::default().with_key_log(Some(again)),
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 10, "two sessions appended: {}", lines.len());
    for line in lines {
        assert!(keylog::parse_line(line).unwrap().is_some());
    }
}

/// SPEC.md's appendix A example is the key log of the test vectors'
/// ChaChaPoly handshake (fixed keys and ephemerals), line for line.
#[test]
fn spec_example_is_the_test_vector_handshake() {
    let lines = Arc::new(Lines::default());
    let suite = Suite::ChaChaPolyBlake2s;
    let config = HandshakeConfig::default().with_key_log(Some(lines.clone()));
    let (mut i, mut r) = capnp_noise_test::fixtures::deterministic_handshakes(
        suite,
        config,
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    capnp_noise_test::fixtures::drive(&mut i, &mut r, usize::MAX).unwrap();
    i.into_session().unwrap();
    r.into_session().unwrap();
    // Both ends logged into the same sink: each line twice.
    let all = lines.lines();
    let mut once: Vec<String> = Vec::new();
    for line in &all {
        if !once.contains(line) {
            once.push(line.clone());
        }
    }
    assert_eq!(all.len(), 2 * once.len());
    let got = once.join("\n");
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/SPEC.md")).unwrap();
    let start = spec
        .find("<!-- keylog-example -->\n```text\n")
        .expect("SPEC.md has the key log example")
        + "<!-- keylog-example -->\n```text\n".len();
    let end = start + spec[start..].find("\n```").unwrap();
    assert_eq!(&spec[start..end], got, "SPEC.md appendix A's example");
}

//! Targets for the parsers of user files and texts that may come from
//! elsewhere: key files, the allow-list and known-vats files, and sturdy
//! refs in their URI and Cap'n Proto forms.
//!
//! Besides "no panic", each checks that what parses means what it says
//! (it round trips through the writer), and that errors stay short
//! whatever the input (a pasted file must not come back as a megabyte of
//! error message) and repeat no key material of it (the body of a PEM or
//! OpenSSH key block: a pasted key file must not leak through an error).

use std::collections::HashSet;
use std::path::Path;

use capnp::message::{Builder, ReaderOptions};
use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::LineEnding;

use super::support::{assert_no_key_material, initiator_identity, responder_identity};
use super::Seed;
use capnp_noise::policy::{AllowList, Tofu};
use capnp_noise::schema::noise_capnp::sturdy_ref;
use capnp_noise::sturdy::{ObjectId, SturdyRef, MAX_OBJECT_ID_LEN};
use capnp_noise::{Error, Identity};

/// How long an error message may be, whatever the input (the path of the
/// file it names comes on top).
const MAX_ERROR_LEN: usize = 1024;
/// The name the targets give the parsed "file" in error messages.
const FUZZ_PATH: &str = "fuzz.txt";

/// A short [`Error::Key`] about `text` that repeats no key material of it.
fn assert_short_key_error(text: &str, e: &Error) {
    assert!(matches!(e, Error::Key(_)), "{e:?}");
    let msg = e.to_string();
    let len = msg.len();
    assert!(
        len <= MAX_ERROR_LEN + FUZZ_PATH.len(),
        "the error grows with the input ({len} bytes): {msg:.200}"
    );
    assert_no_key_material(text, &msg);
}

/// `key_file`: [`Identity::from_pem_or_openssh`] over arbitrary text.
///
/// Checks that whatever loads saves to PKCS#8 and loads back as the same
/// vat, and that errors are short [`Error::Key`]s that repeat no key
/// material.
pub fn key_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Identity::from_pem_or_openssh(text, FUZZ_PATH) {
        Ok(id) => {
            let again = Identity::from_pem_or_openssh(&id.to_pkcs8_pem(), FUZZ_PATH)
                .expect("a saved key loads");
            assert_eq!(again.vat_id(), id.vat_id(), "a key does not round trip");
        }
        Err(e) => assert_short_key_error(text, &e),
    }
}

/// `allow_list`: [`AllowList::parse`] over arbitrary text.
///
/// Checks that the vats parsed are exactly the first fields of the
/// meaningful lines, that writing them back gives the same list, and that
/// errors are short, repeat no key material (a key file given as the list)
/// and name a line that holds something.
pub fn allow_list(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AllowList::parse(text, Path::new(FUZZ_PATH)) {
        Ok(vats) => {
            let firsts: Vec<&str> = meaningful_lines(text)
                .map(|l| l.split_whitespace().next().expect("not empty"))
                .collect();
            let texts: HashSet<String> = vats.iter().map(ToString::to_string).collect();
            assert!(
                firsts.iter().all(|f| texts.contains(*f)),
                "a line's VatId is missing from the parsed list"
            );
            assert_eq!(texts.len(), vats.len());
            assert!(vats.len() <= firsts.len());
            let written: String = vats.iter().map(|v| format!("{v}\n")).collect();
            let back = AllowList::parse(&written, Path::new(FUZZ_PATH)).expect("written list");
            assert_eq!(back, vats, "the list does not round trip");
        }
        Err(e) => {
            assert_short_key_error(text, &e);
            assert_names_a_meaningful_line(text, &e);
        }
    }
}

/// `known_vats`: [`Tofu::parse`] over arbitrary text.
///
/// Checks that each record comes from a meaningful line (in order, with its
/// line number), that its address is a single field a later check could
/// match, that writing the records back gives the same records, and that
/// errors are short, repeat no key material (a key file given as the list)
/// and name a meaningful line.
pub fn known_vats(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Tofu::parse(text, Path::new(FUZZ_PATH)) {
        Ok(records) => {
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(records.len(), meaningful_lines(text).count());
            assert!(records.windows(2).all(|w| w[0].line < w[1].line));
            for r in &records {
                let line = lines[r.line - 1];
                let mut fields = line.split_whitespace();
                assert_eq!(fields.next(), Some(r.address.as_str()));
                assert_eq!(fields.next(), Some(r.vat_id.to_string().as_str()));
                assert!(!r.address.is_empty() && !r.address.starts_with('#'));
            }
            let written: String = records
                .iter()
                .map(|r| format!("{} {}\n", r.address, r.vat_id))
                .collect();
            let back = Tofu::parse(&written, Path::new(FUZZ_PATH)).expect("written records");
            assert_eq!(back.len(), records.len());
            for (b, r) in back.iter().zip(&records) {
                assert_eq!((&b.address, b.vat_id), (&r.address, r.vat_id));
            }
        }
        Err(e) => {
            assert_short_key_error(text, &e);
            assert_names_a_meaningful_line(text, &e);
        }
    }
}

/// The lines of a list file that hold something (not blank, not comments).
fn meaningful_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// A list-file error starts with `path:line: `, and that line holds something.
fn assert_names_a_meaningful_line(text: &str, e: &Error) {
    let msg = e.to_string();
    let rest = msg
        .strip_prefix(&format!("{FUZZ_PATH}:"))
        .unwrap_or_else(|| panic!("the error does not name the file: {msg:.200}"));
    let number: usize = rest
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error does not name a line: {msg:.200}"));
    let line = text
        .lines()
        .nth(number - 1)
        .unwrap_or_else(|| panic!("line {number} does not exist: {msg:.200}"))
        .trim();
    assert!(!line.is_empty() && !line.starts_with('#'), "{msg:.200}");
}

/// `sturdy_uri`: [`SturdyRef`]'s `FromStr` over arbitrary text.
///
/// Checks that what parses formats to a canonical text that parses back to
/// the same ref (and equals the input when nothing in it needed
/// normalising), that its Cap'n Proto form reads back the same, and that an
/// error is short and never repeats the object id.
pub fn sturdy_uri(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<SturdyRef>() {
        Ok(sr) => {
            let canonical = sr.to_string();
            let again: SturdyRef = canonical.parse().expect("a formatted ref parses");
            assert_eq!(again, sr, "the URI does not round trip");
            assert_eq!(again.to_string(), canonical, "formatting is not canonical");
            if !text.contains('[') && !text.bytes().any(|b| b.is_ascii_uppercase()) {
                assert_eq!(canonical, text, "an already canonical URI changed");
            }
            assert_capnp_round_trip(&sr);
        }
        Err(e) => {
            assert_short_key_error(text, &e);
            // The object id is the secret: an error never shows it.
            if let Some((before, object)) = text.rsplit_once('/') {
                if object.len() >= 16 && !before.contains(object) {
                    assert!(
                        !e.to_string().contains(object),
                        "the error repeats the object id"
                    );
                }
            }
        }
    }
}

/// `sturdy_capnp`: [`SturdyRef::read_from`] over an arbitrary Cap'n Proto
/// message (standard stream framing).
///
/// Checks that what reads writes back to the same ref, and that its URI
/// parses back to it.
pub fn sturdy_capnp(data: &[u8]) {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(64 * 1024));
    let Ok(message) = capnp::serialize::read_message_from_flat_slice(&mut &data[..], options)
    else {
        return;
    };
    let Ok(root) = message.get_root::<sturdy_ref::Reader<'_>>() else {
        return;
    };
    match SturdyRef::read_from(root) {
        Ok(sr) => {
            assert_capnp_round_trip(&sr);
            let uri: SturdyRef = sr.to_string().parse().expect("its URI parses");
            assert_eq!(uri, sr);
        }
        // A binary message, not a text that could hold a key file.
        Err(e) => assert_short_key_error("", &e),
    }
}

fn sturdy_message(sr: &SturdyRef) -> Vec<u8> {
    let mut b = Builder::new_default();
    sr.write_to(b.init_root());
    capnp::serialize::write_message_to_words(&b)
}

fn assert_capnp_round_trip(sr: &SturdyRef) {
    let words = sturdy_message(sr);
    let message =
        capnp::serialize::read_message_from_flat_slice(&mut &words[..], ReaderOptions::new())
            .expect("a written message reads");
    let root = message.get_root::<sturdy_ref::Reader<'_>>().expect("root");
    let back = SturdyRef::read_from(root).expect("a written SturdyRef reads");
    assert_eq!(&back, sr, "the Cap'n Proto form does not round trip");
}

/// Seeds of these targets, from real encodings.
pub(super) fn seeds() -> Vec<Seed> {
    let (a, b) = (initiator_identity(), responder_identity());
    let mut v = Vec::new();

    let pem = a.to_pkcs8_pem().to_string();
    v.push(Seed::new("key_file", "pkcs8", pem.clone().into_bytes()));
    let ssh = Ed25519Keypair::from_bytes(&a.signing_key().to_keypair_bytes())
        .and_then(|pair| ssh_key::PrivateKey::new(KeypairData::from(pair), "fuzz@seed"))
        .and_then(|k| k.to_openssh(LineEnding::LF))
        .expect("encoding an OpenSSH key");
    v.push(Seed::new("key_file", "openssh", ssh.as_bytes().to_vec()));
    let public = pem.replace("PRIVATE KEY", "PUBLIC KEY");
    v.push(Seed::new("key_file", "public-key", public.into_bytes()));
    let encrypted = pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
    v.push(Seed::new("key_file", "encrypted", encrypted.into_bytes()));
    let ssh_pub = format!("ssh-ed25519 {} fuzz@seed\n", "A".repeat(68));
    v.push(Seed::new("key_file", "ssh-public", ssh_pub.into_bytes()));

    let allow = format!(
        "\u{feff}# who may connect\r\n{} alice\n\n  {}\tbob # laptop\n",
        a.vat_id(),
        b.vat_id()
    );
    v.push(Seed::new("allow_list", "two-vats", allow.into_bytes()));
    let typo = format!("# list\n{}\n", &b.vat_id().to_string()[..50]);
    v.push(Seed::new("allow_list", "truncated-vat", typo.into_bytes()));

    let known = format!(
        "# known vats\nlocalhost:4000 {}\n[::1]:4000 {} new key\nfiles.example.com:443 {}\n",
        a.vat_id(),
        b.vat_id(),
        a.vat_id()
    );
    v.push(Seed::new("known_vats", "three-records", known.into_bytes()));
    v.push(Seed::new(
        "known_vats",
        "address-only",
        b"localhost:4000\n".to_vec(),
    ));

    let object = ObjectId::from_bytes(&[0x5a; 32]).expect("32 bytes");
    let sr = SturdyRef::new(
        b.vat_id(),
        vec![
            "files.example.com:4000".parse().expect("address"),
            "[2001:db8::1]:4000".parse().expect("address"),
            "127.0.0.1:1".parse().expect("address"),
        ],
        object,
    )
    .expect("sturdy ref");
    v.push(Seed::new(
        "sturdy_uri",
        "three-addresses",
        sr.to_string().into_bytes(),
    ));
    let shouting = sr
        .to_string()
        .replace("files.example.com", "FILES.Example.COM.");
    v.push(Seed::new(
        "sturdy_uri",
        "upper-case-host",
        shouting.into_bytes(),
    ));
    let longest = SturdyRef::new(
        a.vat_id(),
        vec!["h:65535".parse().expect("address")],
        ObjectId::from_bytes(&[0xff; MAX_OBJECT_ID_LEN]).expect("64 bytes"),
    )
    .expect("sturdy ref");
    v.push(Seed::new(
        "sturdy_uri",
        "longest-object",
        longest.to_string().into_bytes(),
    ));
    v.push(Seed::new(
        "sturdy_capnp",
        "three-addresses",
        sturdy_message(&sr),
    ));
    v.push(Seed::new(
        "sturdy_capnp",
        "longest-object",
        sturdy_message(&longest),
    ));
    v
}

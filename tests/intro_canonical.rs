//! Cross-checks the bytes an introducer signs (SPEC "Introductions",
//! `C` = canonical encoding of the `Introduction` struct) against the
//! Cap'n Proto C++ implementation: `capnp convert ...:canonical`.
//!
//! Without the `capnp` binary these tests cannot check anything: they fail
//! under CI (where `.ci/run` installs it) and report a skip elsewhere.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use capnp::message::{AllocationStrategy, Builder, HeapAllocator};
use capnp_noise::intro::{Introduction, INTRODUCTION_CONTEXT};
use capnp_noise::schema::network_capnp::third_party_to_contact;
use capnp_noise::Identity;

/// True if the `capnp` compiler runs. Otherwise a failure under CI,
/// elsewhere a skip that is printed and counted (`capnp_noise_test::peers`).
fn capnp_available() -> bool {
    let check = capnp_noise_test::peers::runs("capnp", &["--version"]);
    capnp_noise_test::peers::usable("the capnp compiler (apt-get install capnproto)", check)
}

/// Runs `capnp convert <formats> schema/network.capnp Introduction` on `input`.
fn capnp_convert(formats: &str, input: &[u8]) -> Vec<u8> {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/network.capnp");
    let mut child = Command::new("capnp")
        .args(["convert", "--quiet", formats])
        .arg(&schema)
        .arg("Introduction")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capnp convert");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "capnp convert {formats}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn sample(addresses: &[&str], seed: u8) -> Introduction {
    Introduction::new(
        &Identity::from_seed(&[seed; 32]),
        Identity::from_seed(&[seed.wrapping_add(1); 32]).vat_id(),
        addresses.iter().map(|a| a.parse().unwrap()).collect(),
        Identity::from_seed(&[seed.wrapping_add(2); 32]).vat_id(),
        [seed; 32],
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(seed)),
    )
    .unwrap()
}

fn signed_canonical(i: &Introduction) -> Vec<u8> {
    let m = i.signed_message();
    assert!(m.starts_with(INTRODUCTION_CONTEXT));
    m[INTRODUCTION_CONTEXT.len()..].to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn canonical_form_matches_the_cpp_implementation() {
    if !capnp_available() {
        return;
    }
    for (n, addrs) in [
        vec![],
        vec!["127.0.0.1:4000"],
        vec!["carol.example:4000", "[2001:db8::1]:443", "10.0.0.1:1"],
    ]
    .into_iter()
    .enumerate()
    {
        let i = sample(&addrs, 0x10 * (n as u8 + 1));
        // The same struct written as a many-segment (non-canonical) message.
        let mut contact = Builder::new_default();
        i.write_to(contact.init_root::<third_party_to_contact::Builder>())
            .unwrap();
        let reader = contact
            .get_root_as_reader::<third_party_to_contact::Reader>()
            .unwrap()
            .get_introduction()
            .unwrap();
        let mut spread = Builder::new(
            HeapAllocator::new()
                .first_segment_words(2)
                .allocation_strategy(AllocationStrategy::FixedSize),
        );
        spread.set_root(reader).unwrap();
        let binary = capnp::serialize::write_message_to_words(&spread);
        assert_eq!(
            capnp_convert("binary:canonical", &binary),
            signed_canonical(&i),
            "introduction {n}"
        );

        // An independent encoding: the C++ parser reads a text literal.
        let vat = |v: &capnp_noise::VatId| format!("(ed25519 = 0x\"{}\")", hex(v.as_bytes()));
        let list = addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "(provider = {}, providerAddresses = [{list}], introducer = {}, recipient = {}, nonce = 0x\"{}\", expiresAt = {})",
            vat(i.provider()),
            vat(i.introducer()),
            vat(i.recipient()),
            hex(i.nonce()),
            i.expires_at_unix(),
        );
        assert_eq!(
            capnp_convert("text:canonical", text.as_bytes()),
            signed_canonical(&i),
            "introduction {n} from text"
        );
    }
}

/// The committed introduction vector's `C` (tests/vectors/introduction.json)
/// is what the C++ implementation makes of the vector's fields, written as
/// a text literal: the vector does not only agree with the code that wrote it.
#[test]
fn the_introduction_vector_is_canonical_for_the_cpp_implementation() {
    if !capnp_available() {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/introduction.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let key = |role: &str| {
        v["vats"][role]["ed25519_public"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let i = &v["introduction"];
    let list = i["provider_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("\"{}\"", a.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "(provider = (ed25519 = 0x\"{}\"), providerAddresses = [{list}], introducer = (ed25519 = 0x\"{}\"), recipient = (ed25519 = 0x\"{}\"), nonce = 0x\"{}\", expiresAt = {})",
        key("provider"),
        key("introducer"),
        key("recipient"),
        i["nonce"].as_str().unwrap(),
        i["expires_at"],
    );
    assert_eq!(
        hex(&capnp_convert("text:canonical", text.as_bytes())),
        i["canonical"].as_str().unwrap()
    );
}

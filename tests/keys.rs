//! Key files against the tools people already use: keys written by
//! `openssl genpkey` and `ssh-keygen` load to the VatId those tools print,
//! our keys are read by `openssl pkey`, and every refusal names the file
//! and the problem.
//!
//! Needs `openssl` and `ssh-keygen` on PATH. Without them a test is skipped
//! (printed and counted), unless CI is set (`true` or `1`): then it fails.
//! Each test needs one tool, so a skip is a whole test, never a part of one.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use capnp_noise::keyfile::{permission_problem, MAX_KEY_FILE_LEN};
use capnp_noise::{Identity, VatId};
use capnp_noise_test::peers;

/// True if `tool` can be run. If not: a failure under CI, elsewhere a
/// skip that is printed and counted (`capnp_noise_test::peers`).
fn have(tool: &str) -> bool {
    let ran = Command::new(tool)
        .arg("-h")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    peers::usable(tool, ran.map(drop))
}

/// Runs a command that must succeed; returns its stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    run(Command::new("openssl").args(args).current_dir(dir))
}

fn ssh_keygen(args: &[&str], dir: &Path) {
    run(Command::new("ssh-keygen").args(args).current_dir(dir));
}

/// The Ed25519 public key of a PEM private key, as OpenSSL computes it: the
/// last 32 bytes of the DER SubjectPublicKeyInfo.
fn openssl_public_key(dir: &Path, key: &str) -> VatId {
    let der = openssl(&["pkey", "-in", key, "-pubout", "-outform", "DER"], dir);
    assert_eq!(der.len(), 44, "Ed25519 SPKI is 44 bytes");
    VatId::from_bytes(der[12..].try_into().unwrap()).unwrap()
}

fn load_err(path: &Path) -> String {
    let err = Identity::load(path).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()),
        "the error must name the file: {err}"
    );
    err
}

#[test]
fn openssl_genpkey_key_loads_to_its_public_key() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    openssl(
        &["genpkey", "-algorithm", "ed25519", "-out", "o.pem"],
        dir.path(),
    );
    let loaded = Identity::load(dir.path().join("o.pem")).unwrap();
    assert_eq!(loaded.vat_id(), openssl_public_key(dir.path(), "o.pem"));
}

#[test]
fn ssh_keygen_key_loads_to_the_key_in_its_pub_file() {
    if !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ssh_keygen(
        &["-q", "-t", "ed25519", "-N", "", "-C", "me@test", "-f", "id"],
        dir.path(),
    );
    let public = fs::read_to_string(dir.path().join("id.pub")).unwrap();
    let fields: Vec<&str> = public.split_whitespace().collect();
    assert_eq!(fields[0], "ssh-ed25519");
    // SSH wire form: string "ssh-ed25519", string key (32 bytes).
    let blob = data_encoding::BASE64.decode(fields[1].as_bytes()).unwrap();
    let key: [u8; 32] = blob[blob.len() - 32..].try_into().unwrap();
    let loaded = Identity::load(dir.path().join("id")).unwrap();
    assert_eq!(loaded.vat_id(), VatId::from_bytes(&key).unwrap());
}

#[test]
fn openssl_reads_our_keys() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::generate();
    id.save(dir.path().join("ours.pem"), false).unwrap();
    let text = openssl(&["pkey", "-in", "ours.pem", "-noout", "-text"], dir.path());
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("ED25519 Private-Key"), "{text}");
    assert_eq!(openssl_public_key(dir.path(), "ours.pem"), id.vat_id());
}

#[test]
fn encrypted_openssl_keys_are_refused() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-aes256",
            "-pass",
            "pass:x",
            "-out",
            "e.pem",
        ],
        dir.path(),
    );
    let err = load_err(&dir.path().join("e.pem"));
    assert!(err.contains("is encrypted"), "{err}");
}

#[test]
fn encrypted_openssh_keys_are_refused() {
    if !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ssh_keygen(
        &["-q", "-t", "ed25519", "-N", "secret", "-f", "enc"],
        dir.path(),
    );
    let err = load_err(&dir.path().join("enc"));
    assert!(err.contains("encrypted OpenSSH key"), "{err}");
}

/// Each `(file, what the error must say)` is refused, naming the file.
fn refused_with(dir: &Path, cases: &[(&str, &str)]) {
    for (file, want) in cases {
        let err = load_err(&dir.join(file));
        assert!(err.contains(want), "{file}: {err}");
    }
}

#[test]
fn openssl_keys_of_other_algorithms_are_refused() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "rsa",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            "rsa.pem",
        ],
        d,
    );
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec8.pem",
        ],
        d,
    );
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.pem",
        ],
        d,
    );
    openssl(&["genpkey", "-algorithm", "x25519", "-out", "x.pem"], d);
    refused_with(
        d,
        &[
            ("rsa.pem", "another algorithm (RSA)"),
            ("ec8.pem", "another algorithm (ECDSA (EC))"),
            ("ec.pem", "another algorithm (EC)"),
            ("x.pem", "another algorithm (X25519)"),
        ],
    );
}

#[test]
fn openssh_keys_of_other_algorithms_are_refused() {
    if !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ssh_keygen(&["-q", "-t", "ecdsa", "-N", "", "-f", "ssh_ecdsa"], d);
    ssh_keygen(
        &["-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", "ssh_rsa"],
        d,
    );
    refused_with(
        d,
        &[
            (
                "ssh_ecdsa",
                "another algorithm (OpenSSH ecdsa-sha2-nistp256)",
            ),
            ("ssh_rsa", "another algorithm (OpenSSH ssh-rsa)"),
            ("ssh_rsa.pub", "public key, not a private key"),
        ],
    );
}

#[test]
fn missing_corrupt_and_oversized_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = Identity::generate().to_pkcs8_pem();
    // Valid base64 of damaged DER: the outer SEQUENCE claims one byte more
    // than there is, so the PKCS#8 structure no longer parses.
    let damaged = {
        let body: String = good.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut der = data_encoding::BASE64.decode(body.as_bytes()).unwrap();
        assert_eq!(
            der[..2],
            [0x30, 0x2e],
            "an Ed25519 PKCS#8 SEQUENCE of 46 bytes"
        );
        der[1] += 1;
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            data_encoding::BASE64.encode(&der)
        )
    };
    let mut truncated_ssh = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    truncated_ssh
        .push_str("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n");
    truncated_ssh.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "damaged.pem",
            damaged.into_bytes(),
            "is corrupt: ASN.1 DER".into(),
        ),
        (
            "cut.pem",
            good.as_bytes()[..good.len() / 2].to_vec(),
            "corrupt".into(),
        ),
        (
            "cut_ssh",
            truncated_ssh.into_bytes(),
            "corrupt OpenSSH".into(),
        ),
        (
            "binary",
            vec![0xff, 0xfe, 0x00, 0x80],
            "not a text key file".into(),
        ),
        ("empty", Vec::new(), "is empty".into()),
        (
            "notes.txt",
            b"just some notes\n".to_vec(),
            "not a PEM or OpenSSH".into(),
        ),
        (
            "huge",
            vec![b'a'; MAX_KEY_FILE_LEN as usize + 1],
            format!("larger than {MAX_KEY_FILE_LEN} bytes"),
        ),
    ];
    for (name, bytes, want) in cases {
        let path = d.join(name);
        fs::write(&path, bytes).unwrap();
        let err = load_err(&path);
        assert!(err.contains(&want), "{name}: {err}");
    }
    let err = load_err(&d.join("absent.pem"));
    assert!(err.contains("does not exist"), "{err}");
}

#[cfg(unix)]
#[test]
fn saved_keys_are_private_and_loose_permissions_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    Identity::generate().save(&path, false).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(permission_problem(&path).unwrap(), None);

    for loose in [0o640, 0o604, 0o620] {
        fs::set_permissions(&path, fs::Permissions::from_mode(loose)).unwrap();
        let problem = permission_problem(&path)
            .unwrap()
            .expect("must be reported");
        assert!(
            problem.contains(&format!("{loose:04o}")) && problem.contains("chmod 600"),
            "{problem}"
        );
        // Still loads: the warning is advice, not a refusal.
        Identity::load(&path).unwrap();
    }
    // Overwriting replaces the file with a private one again.
    Identity::generate().save(&path, true).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(permission_problem(dir.path().join("absent")).is_err());
}

#[test]
fn save_refuses_to_overwrite_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    let first = Identity::generate();
    first.save(&path, false).unwrap();
    let before = fs::read(&path).unwrap();

    let err = Identity::generate()
        .save(&path, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("k.pem") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refused save must not touch the file"
    );
    assert_eq!(Identity::load(&path).unwrap().vat_id(), first.vat_id());

    let second = Identity::generate();
    second.save(&path, true).unwrap();
    assert_eq!(Identity::load(&path).unwrap().vat_id(), second.vat_id());

    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["k.pem"], "temporary files left behind");

    let err = first
        .save(dir.path().join("no/such/dir/k.pem"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/dir/k.pem"), "{err}");
}

#[test]
fn pem_text_round_trips() {
    let id = Identity::generate();
    let pem = id.to_pkcs8_pem();
    let back = Identity::from_pem_or_openssh(&pem, "memory").unwrap();
    assert_eq!(back.vat_id(), id.vat_id());
    // The Noise static key is derived from the key (SPEC.md 14.1): loading
    // it again gives the same one, so clients keep resuming after a restart.
    assert_eq!(back.noise_static_public(), id.noise_static_public());
}

//! The `capnp-noise` binary: keygen, id, known-vats forget, help, and
//! errors (stderr, non-zero exit).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use capnp_noise::{Identity, PeerContext, PeerPolicy, Tofu, VatId};

fn capnp_noise(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capnp-noise"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run capnp-noise")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Asserts success and returns the single line printed on stdout.
fn ok_line(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(o));
    let out = stdout(o);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    out.trim_end().to_string()
}

/// Asserts exit code 1 and an error message on stderr containing `want`.
fn fails_with(o: &Output, want: &str) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert!(
        err.starts_with("capnp-noise: error: ") && err.contains(want),
        "expected {want:?} in: {err}"
    );
    assert!(stdout(o).is_empty(), "{}", stdout(o));
}

#[test]
fn keygen_then_id_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vat = ok_line(&capnp_noise(&["keygen", "-o", "k.pem"], d));
    let vat_id: VatId = vat.parse().expect("keygen prints a VatId");
    assert_eq!(ok_line(&capnp_noise(&["id", "k.pem"], d)), vat);
    assert_eq!(Identity::load(d.join("k.pem")).unwrap().vat_id(), vat_id);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.join("k.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Refuses to overwrite; --force replaces.
    let before = fs::read(d.join("k.pem")).unwrap();
    let o = capnp_noise(&["keygen", "--output", "k.pem"], d);
    fails_with(&o, "already exists");
    assert!(stderr(&o).contains("--force"));
    assert_eq!(fs::read(d.join("k.pem")).unwrap(), before);
    let replaced = ok_line(&capnp_noise(&["keygen", "-o", "k.pem", "--force"], d));
    assert_ne!(replaced, vat);
    assert_eq!(ok_line(&capnp_noise(&["id", "k.pem"], d)), replaced);
}

#[test]
fn keygen_default_file_is_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let vat = ok_line(&capnp_noise(&["keygen"], dir.path()));
    let path = dir.path().join(capnp_noise::keyfile::DEFAULT_KEY_FILE);
    assert_eq!(path.file_name().unwrap(), "capnp-noise.key");
    assert_eq!(Identity::load(&path).unwrap().vat_id().to_string(), vat);
}

#[test]
fn id_errors_are_readable_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails_with(
        &capnp_noise(&["id", "absent.pem"], d),
        "absent.pem does not exist",
    );
    fs::write(d.join("junk"), "hello\n").unwrap();
    fails_with(
        &capnp_noise(&["id", "junk"], d),
        "junk is not a PEM or OpenSSH",
    );
}

#[cfg(unix)]
#[test]
fn id_warns_about_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_line(&capnp_noise(&["keygen", "-o", "k.pem"], d));
    fs::set_permissions(d.join("k.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    let o = capnp_noise(&["id", "k.pem"], d);
    ok_line(&o);
    let err = stderr(&o);
    assert!(
        err.contains("WARN") && err.contains("chmod 600 k.pem"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal"
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [&["frobnicate"][..], &["keygen", "--bogus"], &["id"], &[]] {
        let o = capnp_noise(args, d);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("Usage"), "{args:?}: {}", stderr(&o));
    }
    for args in [
        &["--help"][..],
        &["keygen", "--help"],
        &["id", "--help"],
        &["known-vats", "--help"],
        &["known-vats", "forget", "--help"],
        &["help", "keygen"],
    ] {
        let o = capnp_noise(args, d);
        assert!(o.status.success(), "{args:?}");
        assert!(stdout(&o).contains("Usage: capnp-noise"), "{args:?}");
    }
    let help = stdout(&capnp_noise(&["--help"], d));
    assert!(help.contains("Exit status") && help.contains("2  the command line is invalid"));
    let version = stdout(&capnp_noise(&["--version"], d));
    assert_eq!(
        version.trim(),
        format!("capnp-noise {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_forget_command_in_a_tofu_refusal_works() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_vats");
    let tofu = Tofu::new(&file);
    let ctx = PeerContext::initiator(Some("files.example:4000".into()), None);
    let old = Identity::generate().vat_id();
    let new = Identity::generate().vat_id();
    tofu.check(&old, &ctx).unwrap();
    let refusal = tofu.check(&new, &ctx).unwrap_err().to_string();

    // Run the command the refusal suggests, word for word.
    let line = refusal
        .lines()
        .find(|l| l.trim_start().starts_with("capnp-noise known-vats forget"))
        .unwrap_or_else(|| panic!("no command in: {refusal}"));
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let o = capnp_noise(&words, dir.path());
    assert!(ok_line(&o).contains("forgot 1 record"));

    // Nothing left to forget: exit 1, readable.
    let o = capnp_noise(&words, dir.path());
    fails_with(&o, "no record for files.example:4000");

    // The next connection records the new key.
    tofu.check(&new, &ctx).unwrap();
    assert_eq!(tofu.records().unwrap()[0].vat_id, new);
    let o = capnp_noise(
        &["known-vats", "forget", "x:1", "--file", "absent"],
        dir.path(),
    );
    fails_with(&o, "known-vats file absent does not exist");
}

/// The hidden `package-files DIR` writes what the .deb carries: a manual
/// page for the command and each subcommand, and bash, zsh and fish
/// completions; it shows in no help.
#[test]
fn package_files_writes_the_pages_and_completions_the_deb_carries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = capnp_noise(&["package-files", "out"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut pages: Vec<String> = fs::read_dir(d.join("out/man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "capnp-noise-decode.1",
            "capnp-noise-id.1",
            "capnp-noise-keygen.1",
            "capnp-noise-known-vats-forget.1",
            "capnp-noise-known-vats.1",
            "capnp-noise-tunnel-client.1",
            "capnp-noise-tunnel-server.1",
            "capnp-noise-tunnel.1",
            "capnp-noise.1",
        ]
    );
    let page = fs::read_to_string(d.join("out/man/capnp-noise-tunnel-client.1")).unwrap();
    assert!(
        page.starts_with(".ie"),
        "not roff: {}",
        &page[..40.min(page.len())]
    );
    let version = env!("CARGO_PKG_VERSION");
    let title = page.lines().find(|l| l.starts_with(".TH ")).unwrap();
    assert!(
        title.starts_with(".TH capnp-noise-tunnel-client 1") && title.contains(version),
        "{title}"
    );
    for (file, marker) in [
        ("capnp-noise.bash", "complete -F _capnp__noise"),
        ("_capnp-noise", "#compdef capnp-noise"),
        ("capnp-noise.fish", "complete -c capnp-noise"),
    ] {
        let script = fs::read_to_string(d.join("out/completions").join(file)).unwrap();
        assert!(script.contains(marker), "{file} lacks {marker:?}");
    }
    for help in [&["--help"][..], &["help"]] {
        let out = stdout(&capnp_noise(help, d));
        assert!(
            out.contains("tunnel") && !out.contains("package-files"),
            "{out}"
        );
    }
    // Its argument is required, as any other.
    assert_eq!(capnp_noise(&["package-files"], d).status.code(), Some(2));
}

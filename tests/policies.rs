//! Trust policies over real (in-memory) Noise XX handshakes: each policy
//! accepts and refuses; the allow-list file is edited while it is in use;
//! TOFU records a first key, then refuses a changed one with advice that
//! works.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capnp_noise::wire::{Handshake, HandshakeConfig};
use capnp_noise::{
    AllowList, AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, Refusal, Tofu, VatId,
};
use capnp_noise_test::fixtures::drive;

/// Runs a full handshake from `client` (which dialed `dialed`) to `server`.
/// Returns what each side authenticated: (the server's VatId as the client
/// saw it, the client's VatId as the server saw it).
fn connect(
    client: &Identity,
    client_policy: Arc<dyn PeerPolicy>,
    dialed: Option<&str>,
    server: &Identity,
    server_policy: Arc<dyn PeerPolicy>,
) -> Result<(VatId, VatId), Error> {
    let mut i = Handshake::initiator(
        client,
        client_policy,
        PeerContext::initiator(dialed.map(String::from), None),
        HandshakeConfig::default(),
    )?;
    let mut r = Handshake::responder(
        server,
        server_policy,
        PeerContext::responder(None),
        HandshakeConfig::default(),
    )?;
    drive(&mut i, &mut r, usize::MAX)?;
    Ok((i.peer_vat_id().unwrap(), r.peer_vat_id().unwrap()))
}

/// The verdict on `peer` of a handshake: Ok if it completed and `seen`
/// (picking one side's view) authenticated `peer`, or the refusal reason.
fn verdict(
    outcome: Result<(VatId, VatId), Error>,
    seen: fn((VatId, VatId)) -> VatId,
    peer: &Identity,
) -> Result<(), String> {
    match outcome {
        Ok(ids) => {
            assert_eq!(seen(ids), peer.vat_id());
            Ok(())
        }
        Err(Error::PeerRefused { vat_id, reason }) => {
            assert_eq!(vat_id, peer.vat_id());
            Err(reason)
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// A client with an accept-all policy connecting to `server` guarded by `policy`.
fn server_accepts(
    client: &Identity,
    server: &Identity,
    policy: &Arc<AllowList>,
) -> Result<(), String> {
    let outcome = connect(client, Arc::new(AnyVat), None, server, policy.clone());
    verdict(outcome, |(_, c)| c, client)
}

/// A client guarded by `policy` (having dialed `dialed`) connecting to an
/// accept-all `server`.
fn client_accepts(
    client: &Identity,
    policy: Arc<dyn PeerPolicy>,
    dialed: Option<&str>,
    server: &Identity,
) -> Result<(), String> {
    let outcome = connect(client, policy, dialed, server, Arc::new(AnyVat));
    verdict(outcome, |(s, _)| s, server)
}

#[test]
fn pinned_any_and_closure_policies_over_handshakes() {
    let client = Identity::generate();
    let server = Identity::generate();
    let stranger = Identity::generate();
    let pinned: Arc<dyn PeerPolicy> = Arc::new(Pinned(server.vat_id()));
    client_accepts(&client, pinned.clone(), None, &server).unwrap();
    let reason = client_accepts(&client, pinned, None, &stranger).unwrap_err();
    assert!(reason.contains(&server.vat_id().to_string()), "{reason}");

    client_accepts(&client, Arc::new(AnyVat), None, &stranger).unwrap();

    let allowed = server.vat_id();
    let closure: Arc<dyn PeerPolicy> = Arc::new(move |peer: &VatId, ctx: &PeerContext| {
        if *peer == allowed && ctx.local_is_initiator {
            Ok(())
        } else {
            Err(Refusal::new("the application said no"))
        }
    });
    client_accepts(&client, closure.clone(), None, &server).unwrap();
    assert_eq!(
        client_accepts(&client, closure, None, &stranger).unwrap_err(),
        "the application said no"
    );

    let in_memory = Arc::new(AllowList::from_vat_ids([client.vat_id()]));
    server_accepts(&client, &server, &in_memory).unwrap();
    let reason = server_accepts(&stranger, &server, &in_memory).unwrap_err();
    assert!(reason.contains("not in the allow-list"), "{reason}");
}

#[test]
fn allow_list_file_is_reloaded_while_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowed_vats");
    let server = Identity::generate();
    let alice = Identity::generate();
    let bob = Identity::generate();
    let a = alice.vat_id().to_string();
    let b = bob.vat_id().to_string();

    fs::write(
        &path,
        format!("# who may connect\n\n  {a}   alice's laptop\n"),
    )
    .unwrap();
    let list = Arc::new(AllowList::load(&path).unwrap());
    assert_eq!(list.vat_ids(), [alice.vat_id()]);
    server_accepts(&alice, &server, &list).unwrap();
    let reason = server_accepts(&bob, &server, &list).unwrap_err();
    assert!(
        reason.contains(&b) && reason.contains(&path.display().to_string()),
        "{reason}"
    );

    // Same length, written at once: the (mtime, length) stamp may well be
    // unchanged; the content must still be noticed.
    fs::write(
        &path,
        format!("# who may connect\n\n  {b}   alice's laptop\n"),
    )
    .unwrap();
    server_accepts(&bob, &server, &list).unwrap();
    assert!(server_accepts(&alice, &server, &list).is_err());

    // A malformed edit keeps the previous list in force.
    let typo = format!("{}x", &a[..58]);
    fs::write(&path, format!("{b}\n{typo} alice\n")).unwrap();
    server_accepts(&bob, &server, &list).unwrap();
    assert!(server_accepts(&alice, &server, &list).is_err());
    let err = list.reload().unwrap_err().to_string();
    assert!(err.contains(&format!("{}:2:", path.display())), "{err}");

    fs::write(&path, format!("{b} bob\n{a} alice\n")).unwrap();
    server_accepts(&alice, &server, &list).unwrap();
    server_accepts(&bob, &server, &list).unwrap();

    // No file, no peers; back again, peers again.
    fs::remove_file(&path).unwrap();
    let reason = server_accepts(&alice, &server, &list).unwrap_err();
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(list.vat_ids().is_empty());
    fs::write(&path, format!("{a}\n")).unwrap();
    server_accepts(&alice, &server, &list).unwrap();
    assert!(server_accepts(&bob, &server, &list).is_err());
}

#[test]
fn allow_list_check_interval_and_forced_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowed");
    let server = Identity::generate();
    let alice = Identity::generate();
    let bob = Identity::generate();
    fs::write(&path, format!("{}\n", alice.vat_id())).unwrap();
    let list = Arc::new(
        AllowList::load(&path)
            .unwrap()
            .with_check_interval(Duration::from_secs(3600)),
    );
    fs::write(&path, format!("{}\n", bob.vat_id())).unwrap();
    // Not looked at again within the interval...
    server_accepts(&alice, &server, &list).unwrap();
    assert!(server_accepts(&bob, &server, &list).is_err());
    // ...unless asked.
    assert!(list.reload().unwrap());
    assert!(!list.reload().unwrap(), "nothing changed since");
    server_accepts(&bob, &server, &list).unwrap();
    assert!(server_accepts(&alice, &server, &list).is_err());
}

#[test]
fn malformed_allow_lists_are_refused_at_load_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = Identity::generate().vat_id().to_string();
    let cases = [
        (format!("{good}\n\nnot-a-vat-id\n"), 3, "must start with"),
        (format!("# c\n{}\n", &good[..16]), 2, "fingerprint"),
        (format!("{good}#comment without space\n"), 1, "characters"),
    ];
    for (text, line, want) in cases {
        let path = dir.path().join("list");
        fs::write(&path, &text).unwrap();
        let err = AllowList::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}:{line}:", path.display())) && err.contains(want),
            "{text:?}: {err}"
        );
    }
    fs::write(dir.path().join("bin"), [0xff, 0xfe]).unwrap();
    let err = AllowList::load(dir.path().join("bin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not UTF-8"), "{err}");
    let err = AllowList::load(dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn tofu_records_the_first_key_then_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_vats");
    let tofu: Arc<dyn PeerPolicy> = Arc::new(Tofu::new(&path));
    let client = Identity::generate();
    let server = Identity::generate();
    let impostor = Identity::generate();
    let addr = "vats.example.com:4000";

    client_accepts(&client, tofu.clone(), Some(addr), &server).unwrap();
    let recorded = format!("{addr} {}\n", server.vat_id());
    assert_eq!(fs::read_to_string(&path).unwrap(), recorded);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    client_accepts(&client, tofu.clone(), Some(addr), &server).unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        recorded,
        "no second record"
    );

    let reason = client_accepts(&client, tofu.clone(), Some(addr), &impostor).unwrap_err();
    for want in [
        "DIFFERENT KEY".to_string(),
        format!("recorded:  {}", server.vat_id()),
        format!("presented: {}", impostor.vat_id()),
        format!(
            "capnp-noise known-vats forget {addr} --file {}",
            path.display()
        ),
        format!("delete line 1 of {}", path.display()),
    ] {
        assert!(reason.contains(&want), "missing {want:?} in:\n{reason}");
    }
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        recorded,
        "a refusal records nothing"
    );

    // Other addresses are independent.
    client_accepts(&client, tofu.clone(), Some("[::1]:4000"), &impostor).unwrap();

    // Accepting the change deliberately, as the refusal says.
    assert_eq!(Tofu::new(&path).forget(addr).unwrap(), 1);
    client_accepts(&client, tofu.clone(), Some(addr), &impostor).unwrap();
    assert!(client_accepts(&client, tofu, Some(addr), &server).is_err());
    let records = Tofu::new(&path).records().unwrap();
    let summary: Vec<(&str, VatId)> = records
        .iter()
        .map(|r| (r.address.as_str(), r.vat_id))
        .collect();
    assert_eq!(
        summary,
        [("[::1]:4000", impostor.vat_id()), (addr, impostor.vat_id())]
    );
}

#[test]
fn tofu_as_a_responder_refuses_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_vats");
    let client = Identity::generate();
    let server = Identity::generate();
    let err = connect(
        &client,
        Arc::new(AnyVat),
        Some("x:1"),
        &server,
        Arc::new(Tofu::new(&path)),
    )
    .unwrap_err();
    let Error::PeerRefused { reason, .. } = err else {
        panic!("{err}")
    };
    assert!(reason.contains("not dialed"), "{reason}");
    assert!(!path.exists(), "nothing may be recorded");
}

#[test]
fn tofu_file_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_vats");
    let client = Identity::generate();
    let old = Identity::generate();
    let new = Identity::generate();
    let tofu = || -> Arc<dyn PeerPolicy> { Arc::new(Tofu::new(&path)) };

    // A hand-edited file without a final newline, with two keys for one
    // address (a deliberate rotation): either key is accepted.
    fs::write(
        &path,
        format!(
            "# known vats\nh:1 {} old key\nh:1 {}",
            old.vat_id(),
            new.vat_id()
        ),
    )
    .unwrap();
    client_accepts(&client, tofu(), Some("h:1"), &old).unwrap();
    client_accepts(&client, tofu(), Some("h:1"), &new).unwrap();
    let stranger = Identity::generate();
    let reason = client_accepts(&client, tofu(), Some("h:1"), &stranger).unwrap_err();
    assert!(reason.contains("delete line 2, 3 of"), "{reason}");
    client_accepts(&client, tofu(), Some("h:2"), &old).unwrap();
    assert_eq!(Tofu::new(&path).records().unwrap().len(), 3);

    // Forget keeps comments and other records.
    assert_eq!(Tofu::new(&path).forget("h:1").unwrap(), 2);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("# known vats\nh:2 {}\n", old.vat_id())
    );
    assert_eq!(Tofu::new(&path).forget("h:1").unwrap(), 0);

    // Addresses that cannot be a record.
    for bad in ["", "a b:1", "#x:1"] {
        let reason = client_accepts(&client, tofu(), Some(bad), &old).unwrap_err();
        assert!(reason.contains("cannot be a known-vats record"), "{reason}");
    }

    // A malformed file refuses everyone, naming the line.
    for (text, want) in [
        ("h:1\n".to_string(), "expected \"ADDRESS VATID\""),
        ("h:1 vat1nope\n".to_string(), "invalid VatId"),
    ] {
        fs::write(&path, &text).unwrap();
        let reason = client_accepts(&client, tofu(), Some("h:9"), &old).unwrap_err();
        assert!(
            reason.contains(&format!("{}:1:", path.display())) && reason.contains(want),
            "{reason}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "nothing recorded");
    }
}

#[test]
fn tofu_advice_quotes_awkward_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my known vats");
    let first = Identity::generate().vat_id();
    let second = Identity::generate().vat_id();
    let tofu = Tofu::new(&path);
    let ctx = PeerContext::initiator(Some("h:1".into()), None);
    tofu.check(&first, &ctx).unwrap();
    let reason = tofu.check(&second, &ctx).unwrap_err().to_string();
    assert!(
        reason.contains(&format!("--file '{}'", path.display())),
        "{reason}"
    );
    assert!(Path::new(&path).exists());
}

/// Several `Tofu` values on one file (each with its own open file
/// descriptions, as separate processes would have) meet the same new
/// address at once, each with a different peer: exactly one records its
/// peer; the others are compared against that record and refused.
#[test]
fn tofu_first_uses_racing_on_one_file_record_exactly_one_vat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_vats");
    let peers: Vec<VatId> = (0..8).map(|_| Identity::generate().vat_id()).collect();
    for round in 0..20 {
        let addr = format!("race{round}.example.com:4000");
        let barrier = std::sync::Barrier::new(peers.len());
        let results: Vec<Result<(), Refusal>> = std::thread::scope(|scope| {
            let handles: Vec<_> = peers
                .iter()
                .map(|peer| {
                    let (path, addr, barrier) = (&path, &addr, &barrier);
                    scope.spawn(move || {
                        let tofu = Tofu::new(path);
                        let ctx = PeerContext::initiator(Some(addr.clone()), None);
                        barrier.wait();
                        tofu.check(peer, &ctx)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let accepted: Vec<usize> = (0..peers.len()).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(accepted.len(), 1, "round {round}: several peers recorded");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(r.0.contains("DIFFERENT KEY"), "round {round}: {r}");
        }
        let records: Vec<VatId> = Tofu::new(&path)
            .records()
            .unwrap()
            .into_iter()
            .filter(|r| r.address == addr)
            .map(|r| r.vat_id)
            .collect();
        assert_eq!(records, [peers[accepted[0]]], "round {round}");
    }
}

/// Another process (flock(1)) holds the known-vats lock: a check that
/// would record a new address waits for it up to the lock timeout, then
/// refuses and says why; a check against an existing record needs no lock;
/// once the lock is free, recording works again.
#[cfg(target_os = "linux")]
#[test]
fn tofu_waits_for_another_process_holding_the_lock_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_vats");
    let known = Identity::generate().vat_id();
    fs::write(&path, format!("old.example.com:1 {known}\n")).unwrap();
    let lock_path = dir.path().join("known_vats.lock");
    let ready = dir.path().join("locked");
    // flock(1) takes the lock, says so, and holds it (with its child, which
    // inherits the descriptor) until its process group is killed.
    let mut holder = std::process::Command::new("flock");
    holder
        .arg(&lock_path)
        .arg("sh")
        .arg("-c")
        .arg(format!("touch {} && exec sleep 30", ready.display()));
    std::os::unix::process::CommandExt::process_group(&mut holder, 0);
    let mut holder = holder.spawn().expect("flock(1) from util-linux");
    let started = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "flock did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let timeout = Duration::from_millis(300);
    let tofu = Tofu::new(&path).with_lock_timeout(timeout);
    let at = |a: &str| PeerContext::initiator(Some(a.to_string()), None);

    let new_peer = Identity::generate().vat_id();
    let asked = std::time::Instant::now();
    let refusal = tofu.check(&new_peer, &at("new.example.com:1")).unwrap_err();
    assert!(asked.elapsed() >= timeout, "waited {:?}", asked.elapsed());
    assert!(
        refusal
            .0
            .contains("known_vats.lock is locked by another process"),
        "{refusal}"
    );
    // Decisions on existing records need no lock.
    tofu.check(&known, &at("old.example.com:1")).unwrap();
    let changed = tofu.check(&new_peer, &at("old.example.com:1")).unwrap_err();
    assert!(changed.0.contains("DIFFERENT KEY"), "{changed}");
    let forget = tofu.forget("old.example.com:1").unwrap_err().to_string();
    assert!(forget.contains("locked by another process"), "{forget}");
    assert_eq!(tofu.records().unwrap().len(), 1, "nothing was written");

    let killed = std::process::Command::new("kill")
        .arg("--")
        .arg(format!("-{}", holder.id()))
        .status()
        .unwrap();
    assert!(killed.success());
    holder.wait().unwrap();
    tofu.check(&new_peer, &at("new.example.com:1")).unwrap();
    assert_eq!(tofu.forget("old.example.com:1").unwrap(), 1);
    let records = tofu.records().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].address.as_str(), records[0].vat_id),
        ("new.example.com:1", new_peer)
    );
}

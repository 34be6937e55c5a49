//! Interoperability with an independent implementation of the wire protocol.
//!
//! `tests/peers/noise_peer.py` implements capnp-noise v1 from its description
//! alone, on Python's `noiseprotocol` (Noise), `pycapnp` (the handshake
//! payload, from schema/noise.capnp) and `cryptography` (Ed25519). These tests
//! run it as a child process and drive our sans-IO core against it over real
//! loopback TCP, with a small blocking loop over `std::net::TcpStream`.
//!
//! Both peers print what they verified; the tests compare: each side's view
//! of the other's VatId and Noise static key, and the handshake hash.
//! `tests/peers/future_noise.capnp` is a HandshakePayload with fields a later
//! version might add, which our version 1 core must ignore.
//!
//! Needs `python3` on PATH with `noiseprotocol`, `pycapnp` and `cryptography`.
//! Without them the tests are skipped (printed past libtest's capture, and
//! counted on the binary's last line), except when the `CI` environment
//! variable is `true` or `1`: then they fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use capnp_noise::wire::payload;
use capnp_noise::wire::{
    Handshake, HandshakeConfig, ReadOutcome, Session, SessionConfig, Suite, MAX_DATA_PER_FRAME,
};
use capnp_noise::{AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, ProtocolError, VatId};
use rand::RngCore;

/// Bound on every test: startup, handshake, transfer and exit of the peer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Message sizes exchanged in the happy-path tests: small, empty (a write of
/// nothing sends no frame), exactly one maximal DATA frame, and odd sizes.
/// Each is at most one frame, so the echo runs in lockstep.
const SIZES: [usize; 7] = [
    1,
    1000,
    MAX_DATA_PER_FRAME,
    0,
    MAX_DATA_PER_FRAME,
    17,
    65_517,
];

const PY_SEED: [u8; 32] = [0x5a; 32];
const RUST_SEED: [u8; 32] = [0xa5; 32];

// ----- the Python peer -----

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/noise_peer.py")
}

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema/noise.capnp")
}

/// True if the Python peer can run. Otherwise a failure under CI, elsewhere
/// a skip that is printed and counted (`capnp_noise_test::peers`).
fn python_peer_available() -> bool {
    static CHECK: OnceLock<Result<String, String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        let mut peer = PyPeer::spawn_raw(&["--check"]).map_err(|e| format!("python3: {e}"))?;
        let deadline = Instant::now() + TIMEOUT;
        match peer.next_line(deadline) {
            Some(line) if line.starts_with("VERSIONS") => Ok(line),
            other => {
                let status = peer.wait(deadline);
                Err(format!(
                    "{other:?}, {status}; stderr:\n{}",
                    peer.stderr_text()
                ))
            }
        }
    });
    capnp_noise_test::peers::usable(
        "python3 with noiseprotocol, pycapnp and cryptography \
         (pip install noiseprotocol==0.3.1 pycapnp==2.2.4 cryptography)",
        check.as_ref().map(drop),
    )
}

/// The deadline of a test that runs the Python peer, or `None` to skip it.
fn start() -> Option<Instant> {
    python_peer_available().then(|| Instant::now() + TIMEOUT)
}

/// One run of noise_peer.py. Dropping it kills that exact child.
struct PyPeer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
    seen: Vec<String>,
}

/// The `key=value` fields of one line the peer printed.
type Fields = HashMap<String, String>;

impl PyPeer {
    fn spawn_raw(args: &[&str]) -> std::io::Result<PyPeer> {
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let stderr_reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(PyPeer {
            child,
            lines,
            stderr,
            stderr_reader: Some(stderr_reader),
            seen: Vec::new(),
        })
    }

    fn spawn(role: &str, suite: Suite, extra: &[&str]) -> PyPeer {
        let seed = hex::encode(PY_SEED);
        let schema = schema();
        let mut args = vec![
            "--role",
            role,
            "--suite",
            suite.noise_name(),
            "--seed",
            &seed,
            "--schema",
            schema.to_str().expect("UTF-8 path"),
        ];
        args.extend_from_slice(extra);
        PyPeer::spawn_raw(&args).expect("spawning python3")
    }

    /// What the peer wrote to stderr; all of it once the peer has exited.
    fn stderr_text(&mut self) -> String {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            if let Some(reader) = self.stderr_reader.take() {
                let _ = reader.join();
            }
        }
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the peer printed so far, for failure messages.
    fn report(&mut self) -> String {
        let err = self.stderr_text();
        format!("its output: {:?}\nits stderr: {err}", self.seen)
    }

    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(wait).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Waits for the next line, which must start with `word`, and returns its fields.
    fn expect(&mut self, word: &str, deadline: Instant) -> Fields {
        match self.next_line(deadline) {
            Some(line) if line.split(' ').next() == Some(word) => parse_fields(&line),
            other => panic!(
                "expected {word} from the Python peer, got {other:?}\n{}",
                self.report()
            ),
        }
    }

    fn wait(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the Python peer did not exit in time; output {:?}",
                self.seen
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a successful exit.
    fn finish(mut self, deadline: Instant) {
        let status = self.wait(deadline);
        assert!(
            status.success(),
            "the Python peer failed: {status}\n{}",
            self.report()
        );
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        // Only this child, by its handle; it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_fields(line: &str) -> Fields {
    let mut fields = Fields::new();
    let rest = line.split_once(' ').map_or("", |(_, r)| r);
    let (rest, msg) = match rest.find("msg=") {
        Some(i) => (&rest[..i], Some(&rest[i + 4..])),
        None => (rest, None),
    };
    for token in rest.split_whitespace() {
        if let Some((k, v)) = token.split_once('=') {
            fields.insert(k.to_string(), v.to_string());
        }
    }
    if let Some(msg) = msg {
        fields.insert("msg".into(), msg.to_string());
    }
    fields
}

fn num(fields: &Fields, key: &str) -> usize {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
}

fn py_vat() -> VatId {
    Identity::from_seed(&PY_SEED).vat_id()
}

// ----- a blocking driver of the sans-IO core -----

/// A TCP stream whose every read and write is bounded by one deadline.
struct Conn {
    stream: TcpStream,
    deadline: Instant,
    written: usize,
}

impl Conn {
    fn new(stream: TcpStream, deadline: Instant) -> Conn {
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            deadline,
            written: 0,
        }
    }

    fn connect(port: u16, deadline: Instant) -> Conn {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connecting to the peer");
        Conn::new(stream, deadline)
    }

    fn accept(listener: &TcpListener, deadline: Instant) -> Conn {
        listener.set_nonblocking(true).expect("nonblocking");
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    return Conn::new(stream, deadline);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the Python peer never connected");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    fn remaining(&self) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "test deadline passed");
        left
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        self.stream.set_read_timeout(Some(self.remaining()))?;
        Ok(self.stream.read(buf)?)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream.set_write_timeout(Some(self.remaining()))?;
        self.stream.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Runs `hs` to completion and turns it into a session.
    fn handshake(&mut self, mut hs: Handshake) -> Result<Session, Error> {
        self.drive(&mut hs)?;
        let mut session = hs.into_session()?;
        self.flush(&mut session)?;
        Ok(session)
    }

    /// Drives the handshake until it finishes or fails; the handshake stays
    /// with the caller, so a test can look at it after a failure.
    fn drive(&mut self, hs: &mut Handshake) -> Result<(), Error> {
        let mut buf = vec![0u8; 8192];
        loop {
            let out = hs.pending_output().to_vec();
            if !out.is_empty() {
                self.write_all(&out)?;
                hs.consume_output(out.len());
            }
            if hs.is_finished() {
                return Ok(());
            }
            let n = self.read(&mut buf)?;
            if n == 0 {
                return Err(Error::UnexpectedEof {
                    during: "the handshake",
                });
            }
            // 8 KiB never exceeds what a handshake keeps for the session.
            let taken = hs.feed(&buf[..n])?;
            assert_eq!(taken, n);
        }
    }

    /// Writes out everything the session has sealed.
    fn flush(&mut self, s: &mut Session) -> Result<(), Error> {
        while s.wants_write() {
            let out = s.pending_output().to_vec();
            self.write_all(&out)?;
            s.consume_output(out.len());
        }
        Ok(())
    }

    /// Sends `data` and everything buffered before it.
    fn send(&mut self, s: &mut Session, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let n = s.write(data)?;
            data = &data[n..];
            self.flush(s)?;
        }
        s.flush()?;
        self.flush(s)
    }

    /// Reads until the session has plaintext or the peer's close.
    fn recv(&mut self, s: &mut Session, out: &mut [u8]) -> Result<ReadOutcome, Error> {
        loop {
            match s.read(out)? {
                ReadOutcome::NeedInput => {
                    let room = s.recv_buffer();
                    let n = self.read(room)?;
                    if n == 0 {
                        s.feed_eof();
                    } else {
                        s.commit_recv(n);
                    }
                }
                done => return Ok(done),
            }
        }
    }

    /// Ends our direction (FIN) but keeps the socket open, so unread peer
    /// bytes cannot turn the peer's clean EOF into a reset.
    fn hang_up(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// After the peer's CLOSE: the stream must end with no further byte.
    fn expect_clean_end(&mut self, s: &mut Session) {
        assert!(s.peer_closed());
        assert_eq!(s.buffered_ciphertext(), 0, "bytes after the peer's CLOSE");
        let mut one = [0u8; 1];
        assert_eq!(self.read(&mut one).expect("reading to EOF"), 0);
        s.feed_eof();
        assert_eq!(s.read(&mut [0u8; 16]).unwrap(), ReadOutcome::Closed);
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// Checks the Python peer's HANDSHAKE line against our finished session.
fn check_handshake_line(line: &Fields, session: &Session, me: &Identity, suite: Suite) {
    assert_eq!(line["suite"], suite.noise_name());
    assert_eq!(line["local_vat"], hex::encode(py_vat().as_bytes()));
    assert_eq!(
        line["peer_vat"],
        hex::encode(me.vat_id().as_bytes()),
        "Python saw another VatId"
    );
    assert_eq!(
        line["peer_static"],
        hex::encode(me.noise_static_public()),
        "Python saw another Noise static key"
    );
    assert_eq!(
        line["hash"],
        hex::encode(session.handshake_hash()),
        "handshake hashes differ"
    );
    assert_eq!(session.peer_vat_id(), py_vat());
    assert_eq!(session.suite(), suite);
}

fn initiator(me: &Identity, policy: Arc<dyn PeerPolicy>, suite: Suite) -> Handshake {
    Handshake::initiator(
        me,
        policy,
        PeerContext::initiator(None, None),
        HandshakeConfig::with_suite(suite),
    )
    .expect("initiator")
}

fn responder(me: &Identity, policy: Arc<dyn PeerPolicy>, config: HandshakeConfig) -> Handshake {
    Handshake::responder(me, policy, PeerContext::responder(None), config).expect("responder")
}

/// Starts a Python responder and connects to it.
fn python_responder(suite: Suite, extra: &[&str], deadline: Instant) -> (PyPeer, Conn) {
    let mut py = PyPeer::spawn("responder", suite, &[&["--listen", "0"], extra].concat());
    let port = num(&py.expect("LISTENING", deadline), "port");
    let conn = Conn::connect(u16::try_from(port).expect("a port"), deadline);
    (py, conn)
}

/// Starts a Python initiator and accepts its connection.
fn python_initiator(suite: Suite, extra: &[&str], deadline: Instant) -> (PyPeer, Conn) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let py = PyPeer::spawn(
        "initiator",
        suite,
        &[&["--connect", addr.as_str()], extra].concat(),
    );
    let conn = Conn::accept(&listener, deadline);
    (py, conn)
}

/// The length of the preamble and message 1: all an initiator sends before message 3.
fn preamble_and_msg1_len(suite: Suite) -> usize {
    // Magic (11), version, name length, name; then length prefix and e.
    11 + 1 + 1 + suite.noise_name().len() + 2 + 32
}

// ----- happy paths -----

/// Rust initiator, Python responder echoing; the Python side rekeys after
/// every second echo, the Rust side rekeys explicitly twice. With
/// `future_payload` the Python peer's handshake payload carries fields that
/// protocol version 1 does not define, which we must ignore.
fn rust_initiator_python_responder(suite: Suite, future_payload: bool) {
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let my_hex = hex::encode(me.vat_id().as_bytes());
    let mut args = vec!["--expect", &my_hex, "--rekey-every", "2"];
    if future_payload {
        args.push("--future-payload");
    }
    let (mut py, mut conn) = python_responder(suite, &args, deadline);
    let mut s = conn
        .handshake(initiator(&me, Arc::new(Pinned(py_vat())), suite))
        .expect("handshake");
    check_handshake_line(&py.expect("HANDSHAKE", deadline), &s, &me, suite);

    let mut buf = vec![0u8; 70_000];
    let mut rust_rekeys = 0;
    for (i, &size) in SIZES.iter().enumerate() {
        let msg = random_bytes(size);
        conn.send(&mut s, &msg).expect("send");
        let mut echo = Vec::new();
        while echo.len() < size {
            match conn.recv(&mut s, &mut buf).expect("recv") {
                ReadOutcome::Data(n) => echo.extend_from_slice(&buf[..n]),
                other => panic!("{other:?} before the echo of message {i}"),
            }
        }
        assert!(echo == msg, "echo of message {i} ({size} bytes) differs");
        if i % 3 == 1 {
            s.rekey().expect("rekey");
            conn.flush(&mut s).expect("flush");
            rust_rekeys += 1;
        }
    }
    s.close().expect("close");
    conn.flush(&mut s).expect("flush");
    conn.stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        conn.recv(&mut s, &mut buf).expect("the peer's close"),
        ReadOutcome::Closed
    );
    conn.expect_clean_end(&mut s);

    let done = py.expect("DONE", deadline);
    let total: usize = SIZES.iter().sum();
    let frames = SIZES.iter().filter(|&&n| n > 0).count();
    assert_eq!(num(&done, "recv_bytes"), total);
    assert_eq!(num(&done, "sent_bytes"), total);
    assert_eq!(num(&done, "rekeys_recv"), rust_rekeys);
    assert_eq!(num(&done, "rekeys_sent"), frames / 2);
    assert_eq!(num(&done, "frames_recv"), frames + rust_rekeys + 1);
    py.finish(deadline);
}

/// What the Python initiator sends: DATA sizes, and R for a REKEY.
/// REKEYs come first, twice in a row, and between messages.
const SCRIPT: &str = "R,R,65517,1000,R,1,0,65518,R,R,17,65518";

/// Python initiator sending [`SCRIPT`], Rust responder echoing and rekeying
/// on its schedule (every 3 frames). With `coalesce`, message 3 and the first
/// transport frame arrive in one write, so the handshake must hand the surplus
/// bytes to the session.
fn python_initiator_rust_responder(suite: Suite, coalesce: bool) {
    const INTERVAL: u64 = 3;
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let my_hex = hex::encode(me.vat_id().as_bytes());
    let mut args = vec!["--expect", &my_hex, "--send", SCRIPT];
    if coalesce {
        args.push("--coalesce");
    }
    let (mut py, mut conn) = python_initiator(suite, &args, deadline);
    let config = HandshakeConfig {
        suites: vec![suite],
        session: SessionConfig {
            rekey_interval: INTERVAL,
        },
        allow_self: false,
        key_log: None,
    };
    let mut s = conn
        .handshake(responder(&me, Arc::new(Pinned(py_vat())), config))
        .expect("handshake");
    check_handshake_line(&py.expect("HANDSHAKE", deadline), &s, &me, suite);

    let mut buf = vec![0u8; 70_000];
    let (mut echoed_frames, mut echoed_bytes) = (0, 0);
    loop {
        match conn.recv(&mut s, &mut buf).expect("recv") {
            ReadOutcome::Data(n) => {
                // The buffer holds a whole frame, so each read is one DATA frame.
                conn.send(&mut s, &buf[..n]).expect("echo");
                echoed_frames += 1;
                echoed_bytes += n;
            }
            ReadOutcome::Closed => break,
            ReadOutcome::NeedInput => unreachable!("recv reads until there is something"),
        }
    }
    s.close().expect("close");
    conn.flush(&mut s).expect("flush");
    conn.stream.shutdown(Shutdown::Write).expect("shutdown");
    conn.expect_clean_end(&mut s);

    let done = py.expect("DONE", deadline);
    let sizes: Vec<usize> = SCRIPT.split(',').filter_map(|t| t.parse().ok()).collect();
    let total: usize = sizes.iter().sum();
    assert_eq!(echoed_bytes, total);
    assert_eq!(echoed_frames, sizes.iter().filter(|&&n| n > 0).count());
    assert_eq!(num(&done, "sent_bytes"), total);
    assert_eq!(num(&done, "recv_bytes"), total);
    assert_eq!(num(&done, "rekeys_sent"), SCRIPT.matches('R').count());
    assert_eq!(
        num(&done, "rekeys_recv") as u64,
        echoed_frames as u64 / INTERVAL,
        "our scheduled rekeys, as the Python peer counted them"
    );
    py.finish(deadline);
}

#[test]
fn rust_initiator_python_responder_chachapoly() {
    rust_initiator_python_responder(Suite::ChaChaPolyBlake2s, false);
}

#[test]
fn rust_initiator_python_responder_aesgcm() {
    rust_initiator_python_responder(Suite::AesGcmSha256, false);
}

#[test]
fn rust_initiator_ignores_unknown_payload_fields_of_a_later_version() {
    rust_initiator_python_responder(Suite::ChaChaPolyBlake2s, true);
}

#[test]
fn python_initiator_rust_responder_chachapoly() {
    python_initiator_rust_responder(Suite::ChaChaPolyBlake2s, true);
}

#[test]
fn python_initiator_rust_responder_aesgcm() {
    python_initiator_rust_responder(Suite::AesGcmSha256, false);
}

// ----- failures -----

/// The Python peer's report that the connection ended while it waited for
/// the next handshake message: how many bytes of that message it got.
fn eof_report(py: &mut PyPeer, deadline: Instant) -> usize {
    let err = py.expect("ERROR", deadline);
    assert_eq!(err["kind"], "eof", "{err:?}");
    num(&err, "bytes_after")
}

/// Runs a Rust initiator that must fail after message 2, and checks that it
/// never produced message 3, on our side and as the Python peer saw it.
fn initiator_fails_before_msg3(
    deadline: Instant,
    policy: Arc<dyn PeerPolicy>,
    py_extra: &[&str],
) -> Error {
    let suite = Suite::ChaChaPolyBlake2s;
    let me = Identity::from_seed(&RUST_SEED);
    let (mut py, mut conn) = python_responder(suite, py_extra, deadline);
    let mut hs = initiator(&me, policy, suite);
    let err = conn.drive(&mut hs).expect_err("the handshake must fail");
    assert!(hs.pending_output().is_empty(), "message 3 was produced");
    assert_eq!(
        conn.written,
        preamble_and_msg1_len(suite),
        "more than message 1 was sent"
    );
    assert!(hs.into_session().is_err());
    conn.hang_up();
    assert_eq!(eof_report(&mut py, deadline), 0);
    err
}

#[test]
fn python_signature_over_another_static_key_fails_rust_initiator() {
    let Some(deadline) = start() else { return };
    let err =
        initiator_fails_before_msg3(deadline, Arc::new(AnyVat), &["--forge", "sig-other-static"]);
    assert!(matches!(err, Error::BadIdentityProof(_)), "{err}");
}

#[test]
fn rust_initiator_refuses_an_unpinned_python_responder_before_message_3() {
    let Some(deadline) = start() else { return };
    let pinned = Identity::from_seed(&[0x77; 32]).vat_id();
    let err = initiator_fails_before_msg3(deadline, Arc::new(Pinned(pinned)), &[]);
    match err {
        Error::PeerRefused { vat_id, .. } => assert_eq!(vat_id, py_vat()),
        other => panic!("expected PeerRefused, got {other}"),
    }
}

#[test]
fn python_claiming_the_pinned_vat_id_without_its_key_fails() {
    let Some(deadline) = start() else { return };
    let victim = Identity::from_seed(&[0x77; 32]).vat_id();
    let claim = format!("claim-vatid:{}", hex::encode(victim.as_bytes()));
    let err = initiator_fails_before_msg3(deadline, Arc::new(Pinned(victim)), &["--forge", &claim]);
    assert!(matches!(err, Error::BadIdentityProof(_)), "{err}");
}

/// Runs a Rust responder (accepting any vat) against a Python initiator,
/// and returns the error that must end the handshake. Our side then hangs up.
fn responder_fails(
    py_suite: Suite,
    config: HandshakeConfig,
    py_extra: &[&str],
    deadline: Instant,
) -> (Error, PyPeer, Conn) {
    let me = Identity::from_seed(&RUST_SEED);
    let (py, mut conn) = python_initiator(py_suite, py_extra, deadline);
    let mut hs = responder(&me, Arc::new(AnyVat), config);
    let err = conn.drive(&mut hs).expect_err("the handshake must fail");
    assert!(!hs.is_finished() && hs.into_session().is_err());
    conn.hang_up();
    (err, py, conn)
}

#[test]
fn python_initiator_signature_over_another_static_key_fails_rust_responder() {
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let (err, mut py, _conn) = responder_fails(
        Suite::ChaChaPolyBlake2s,
        HandshakeConfig::default(),
        &["--forge", "sig-other-static", "--send", "1"],
        deadline,
    );
    assert!(matches!(err, Error::BadIdentityProof(_)), "{err}");
    // Python finished its side of the handshake and then met the end of the stream.
    let out = py.expect("HANDSHAKE", deadline);
    assert_eq!(out["peer_vat"], hex::encode(me.vat_id().as_bytes()));
    assert_eq!(py.expect("ERROR", deadline)["kind"], "eof");
}

#[test]
fn rust_responder_closes_silently_on_a_suite_it_does_not_accept() {
    let Some(deadline) = start() else { return };
    let (err, mut py, conn) = responder_fails(
        Suite::AesGcmSha256,
        HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s),
        &["--send", "1"],
        deadline,
    );
    assert!(
        matches!(&err, Error::Protocol(ProtocolError::UnsupportedSuite(name)) if name == "Noise_XX_25519_AESGCM_SHA256"),
        "{err}"
    );
    assert_eq!(conn.written, 0, "the responder answered");
    assert_eq!(eof_report(&mut py, deadline), 0);
}

/// The Python peer's own checks are real: a Rust initiator whose signature
/// covers another static key is rejected by it.
#[test]
fn python_rejects_a_rust_signature_over_another_static_key() {
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let other = Identity::generate();
    let forged = payload::encode(
        &me.vat_id(),
        &me.sign(&payload::binding_message(other.noise_static_public())),
    );
    let (mut py, mut conn) = python_responder(Suite::ChaChaPolyBlake2s, &[], deadline);
    let mut hs = initiator(&me, Arc::new(AnyVat), Suite::ChaChaPolyBlake2s);
    hs.replace_payload_for_tests(forged.into());
    // Our side finishes: it has sent message 3 and trusts the responder.
    let mut s = conn.handshake(hs).expect("our side of the handshake");
    let err = py.expect("ERROR", deadline);
    assert_eq!(err["kind"], "bad-identity-proof", "{err:?}");
    let got = conn
        .recv(&mut s, &mut [0u8; 64])
        .expect_err("the peer hung up");
    assert!(matches!(got, Error::UnexpectedEof { .. }), "{got}");
}

/// The Python initiator, pinning another VatId, refuses our responder after
/// message 2 and never sends message 3.
#[test]
fn python_initiator_refuses_an_unpinned_rust_responder() {
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let pinned = hex::encode(Identity::from_seed(&[0x77; 32]).vat_id().as_bytes());
    let (err, mut py, _conn) = responder_fails(
        Suite::ChaChaPolyBlake2s,
        HandshakeConfig::default(),
        &["--expect", &pinned, "--send", "1"],
        deadline,
    );
    // Our responder waited for a message 3 that never came.
    assert!(matches!(err, Error::UnexpectedEof { .. }), "{err}");
    let refused = py.expect("REFUSED", deadline);
    assert_eq!(refused["peer_vat"], hex::encode(me.vat_id().as_bytes()));
    assert_eq!(py.wait(deadline).code(), Some(3));
}

/// SPEC.md 2: a responder that accepts only the mandatory suite (here the
/// independent Python peer, which reads the preamble alone and closes with
/// message 1 unread, so the initiator usually sees a reset, not an EOF) is
/// reached by an initiator that prefers AES-GCM and accepts the mandatory
/// suite: the first attempt ends as a silent close, and the one retry
/// `HandshakeConfig::fallback_after` allows, on a new connection, works.
#[tokio::test]
async fn rust_initiator_retries_with_the_mandatory_suite_a_python_responder_that_takes_only_it() {
    use capnp_noise::stream::{self, StreamConfig};
    use capnp_noise::wire::EOF_BEFORE_MESSAGE_2;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(deadline) = start() else { return };
    let mut py = PyPeer::spawn(
        "responder",
        Suite::ChaChaPolyBlake2s,
        &["--listen", "0", "--connections", "2"],
    );
    let port = num(&py.expect("LISTENING", deadline), "port") as u16;
    let me = Identity::from_seed(&RUST_SEED);
    let config =
        HandshakeConfig::default().with_suites(vec![Suite::AesGcmSha256, Suite::ChaChaPolyBlake2s]);
    let attempt = |handshake: HandshakeConfig| {
        let me = me.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let config = StreamConfig::default().with_handshake(handshake);
            stream::connect(tcp, &me, Arc::new(Pinned(py_vat())), config).await
        }
    };
    let err = attempt(config.clone()).await.unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2),
        "{err:?}\n{}",
        py.report()
    );
    let refused = py.expect("UNSUPPORTED_SUITE", deadline);
    assert_eq!(refused["name"], Suite::AesGcmSha256.noise_name());
    let retry = config.fallback_after(&err).expect("a retry is due");
    let mut s = attempt(retry).await.unwrap();
    assert_eq!(s.suite(), Suite::ChaChaPolyBlake2s);
    let line = py.expect("HANDSHAKE", deadline);
    assert_eq!(line["suite"], Suite::ChaChaPolyBlake2s.noise_name());
    assert_eq!(line["hash"], hex::encode(s.handshake_hash()));
    // The Python peer echoes; then both sides close.
    let data = random_bytes(5000);
    s.write_all(&data).await.unwrap();
    s.flush().await.unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    py.finish(deadline);
}

/// SPEC.md 14.6: a responder of revision 1.1 (the independent Python peer,
/// which knows only the XX names) closes without a word on an IK preamble.
/// `stream::connect_resuming` then reports the silent close and forgets its
/// record, so the next connection runs XX; early data goes after the
/// handshake and is echoed back exactly once each time.
#[tokio::test]
async fn rust_resuming_initiator_falls_back_to_xx_with_a_python_responder_of_revision_1_1() {
    use capnp_noise::stream::{self, StreamConfig};
    use capnp_noise::wire::{EarlyData, ResumptionCache, EOF_BEFORE_MESSAGE_2};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(deadline) = start() else { return };
    let me = Identity::from_seed(&RUST_SEED);
    let cache = Arc::new(ResumptionCache::new(4));
    // The peer takes one connection per run (and, with --connections,
    // closes silently on suites it does not know before taking the next).
    let listen = |connections: &str| {
        let mut py = PyPeer::spawn(
            "responder",
            Suite::ChaChaPolyBlake2s,
            &["--listen", "0", "--connections", connections],
        );
        let port = num(&py.expect("LISTENING", deadline), "port") as u16;
        (py, port)
    };
    let attempt = |port: u16| {
        let me = me.clone();
        let cache = cache.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let config = StreamConfig::default()
                .with_handshake(HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s));
            stream::connect_resuming(
                tcp,
                &me,
                Arc::new(Pinned(py_vat())),
                config,
                cache,
                &py_vat(),
                Some(EarlyData::replayable_not_forward_secret(&b"early call"[..])),
            )
            .await
        }
    };
    let echo_and_close = |mut s: stream::NoiseStream<tokio::net::TcpStream>| async move {
        let mut back = [0u8; 10];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"early call");
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "echoed once");
    };
    // No record: XX, and the record is kept.
    let (mut py, port) = listen("1");
    echo_and_close(attempt(port).await.unwrap()).await;
    py.expect("HANDSHAKE", deadline);
    assert_eq!(num(&py.expect("DONE", deadline), "recv_bytes"), 10);
    py.finish(deadline);
    assert!(cache.get(&py_vat()).is_some());
    // With the record: IK, which the 1.1 peer does not know.
    let (mut py, port) = listen("2");
    let err = attempt(port).await.unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2),
        "{err:?}\n{}",
        py.report()
    );
    let refused = py.expect("UNSUPPORTED_SUITE", deadline);
    assert_eq!(refused["name"], "Noise_IK_25519_ChaChaPoly_BLAKE2s");
    assert!(cache.get(&py_vat()).is_none(), "the record is forgotten");
    // The retry runs XX.
    echo_and_close(attempt(port).await.unwrap()).await;
    py.expect("HANDSHAKE", deadline);
    assert_eq!(num(&py.expect("DONE", deadline), "recv_bytes"), 10);
    py.finish(deadline);
}

//! Interoperation of the C++ adapter (`cpp/capnp-noise.h`: a kj stream over
//! this crate's C ABI) with the Rust library, with itself, and through the
//! tunnel.
//!
//! `tests/cpp/interop.c++` (an `Office` client and server on kj, with
//! capnp's `TwoPartyClient`/`TwoPartyServer` unchanged) is compiled with
//! g++ and pkg-config against the staticlib cargo built for these tests,
//! twice: plainly (-O2), and under AddressSanitizer and
//! UndefinedBehaviorSanitizer. Every scenario runs with both builds. Each
//! pairing checks calls that see the caller's VatId, a 16 MiB message, 100
//! sequential connections, a wrong pin refused before the client reveals
//! itself, and a cut stream reported as an error.
//!
//! Needs g++, pkg-config, libcapnp-dev and capnproto (Debian; `.ci/run`
//! installs them): without them the tests fail under CI=true and report a
//! loud skip elsewhere.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{AllowList, AnyVat, Error, Identity, Pinned, VatId};
use capnp_noise_test::office::Office;
use capnp_noise_test::schema::demo_capnp::office;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIXTEEN_MIB: usize = 16 << 20;

/// The C++ test program, built once per flavour.
struct Builds {
    programs: Vec<(&'static str, PathBuf)>,
    /// examples/cpp/office_to_cloud.c++, built plainly.
    example: PathBuf,
    /// tests/c/session.c: the C ABI from C11, under ASan and UBSan.
    c_session: PathBuf,
}

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn builds() -> Option<&'static Builds> {
    static BUILDS: OnceLock<Option<Builds>> = OnceLock::new();
    BUILDS.get_or_init(build).as_ref()
}

fn build() -> Option<Builds> {
    let tools = have("g++", &["--version"])
        && have("gcc", &["--version"])
        && have("pkg-config", &["--exists", "capnp-rpc"])
        && have("capnp", &["--version"]);
    if !tools {
        assert!(
            std::env::var_os("CI").is_none(),
            "g++, pkg-config, libcapnp-dev and capnproto are required under CI for the C++ tests"
        );
        eprintln!(
            "SKIPPED: the C++ interop tests need g++, pkg-config, libcapnp-dev and capnproto \
             (apt-get install g++ pkg-config libcapnp-dev capnproto); NOTHING was checked"
        );
        return None;
    }
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir.join("../..");
    // The test binary runs from target/<profile>/deps, where cargo also put
    // the staticlib it built for these tests.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    let staticlib = deps.join("libcapnp_noise_c.a");
    assert!(staticlib.exists(), "{} was not built", staticlib.display());
    let dir = deps.parent().expect("profile dir").join("capnp-noise-cpp");
    std::fs::create_dir_all(&dir).expect("build dir");

    let schema_dir = root.join("crates/capnp-noise-test/schema");
    let status = with_pwd(&mut Command::new("capnp"))
        .arg("compile")
        .arg(format!("-oc++:{}", dir.display()))
        .arg(format!("--src-prefix={}", schema_dir.display()))
        .arg(schema_dir.join("demo.capnp"))
        .status()
        .expect("capnp compile");
    assert!(status.success(), "capnp compile failed");

    let pkg = Command::new("pkg-config")
        .args(["--cflags", "--libs", "capnp-rpc"])
        .output()
        .expect("pkg-config");
    let pkg = String::from_utf8(pkg.stdout).expect("pkg-config output");
    let flavours: [(&str, &[&str]); 2] = [
        ("plain", &["-O2"]),
        (
            "asan+ubsan",
            &[
                "-O1",
                "-g",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
                // g++ 12 warns inside kj's headers (capnp::CallContext::getResults) at -O1.
                "-Wno-maybe-uninitialized",
            ],
        ),
    ];
    let mut inputs = Inputs {
        include: vec![crate_dir.join("include"), root.join("cpp"), dir.clone()],
        sources: vec![root.join("cpp/capnp-noise.c++"), dir.join("demo.capnp.c++")],
        staticlib,
        pkg_config: pkg,
        newest: None,
    };
    inputs.newest = [
        crate_dir.join("include/capnp_noise.h"),
        root.join("cpp/capnp-noise.c++"),
        root.join("cpp/capnp-noise.h"),
        schema_dir.join("demo.capnp"),
        inputs.staticlib.clone(),
    ]
    .iter()
    .filter_map(|p| modified(p))
    .max();
    let mut programs = Vec::new();
    for (name, flags) in flavours {
        let out = dir.join(format!("interop-{}", name.replace('+', "-")));
        let main = crate_dir.join("tests/cpp/interop.c++");
        compile(name, &out, &main, flags, &inputs);
        programs.push((name, out));
    }
    let example = dir.join("office_to_cloud");
    let main = root.join("examples/cpp/office_to_cloud.c++");
    compile("example", &example, &main, &["-O2"], &inputs);

    let c_session = dir.join("c-session");
    let main = crate_dir.join("tests/c/session.c");
    if modified(&c_session).is_none_or(|built| Some(built) <= inputs.newest.max(modified(&main))) {
        let status = Command::new("gcc")
            .args(["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-g"])
            .args(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
            .arg(format!("-I{}", crate_dir.join("include").display()))
            .arg(&main)
            .arg("-o")
            .arg(&c_session)
            .arg(&inputs.staticlib)
            .args(["-lpthread", "-ldl", "-lm"])
            .status()
            .expect("run gcc");
        assert!(status.success(), "building tests/c/session.c failed");
    }
    Some(Builds {
        programs,
        example,
        c_session,
    })
}

/// What the C++ programs are built from, besides their own main file.
struct Inputs {
    include: Vec<PathBuf>,
    sources: Vec<PathBuf>,
    staticlib: PathBuf,
    pkg_config: String,
    /// The newest modification time of everything above.
    newest: Option<std::time::SystemTime>,
}

/// Compiles and links one C++ program, unless it was built already (by an
/// earlier run of these tests) from the same inputs.
fn compile(name: &str, out: &Path, main: &Path, flags: &[&str], inputs: &Inputs) {
    let newest = inputs.newest.max(modified(main));
    if modified(out).is_some_and(|built| Some(built) > newest) {
        return;
    }
    let started = Instant::now();
    let status = Command::new("g++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror"])
        .args(flags)
        .args(inputs.include.iter().map(|d| format!("-I{}", d.display())))
        .arg(main)
        .args(&inputs.sources)
        .arg("-o")
        .arg(out)
        .arg(&inputs.staticlib)
        .args(inputs.pkg_config.split_whitespace())
        .args(["-lpthread", "-ldl", "-lm"])
        .status()
        .expect("run g++");
    assert!(status.success(), "building the {name} C++ program failed");
    eprintln!(
        "built the {name} C++ program in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs `f` once per flavour of the C++ program.
fn each_build(f: impl Fn(&'static str, &Path)) {
    let Some(b) = builds() else { return };
    for (name, program) in &b.programs {
        let started = Instant::now();
        f(name, program);
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("{test} ({name}): {:.1} s", started.elapsed().as_secs_f64());
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// kj programs warn when PWD is not the working directory (cargo changes
/// only the latter).
fn with_pwd(cmd: &mut Command) -> &mut Command {
    if let Ok(cwd) = std::env::current_dir() {
        cmd.env("PWD", cwd);
    }
    cmd
}

fn sanitizer_env(cmd: &mut Command) -> &mut Command {
    with_pwd(cmd)
        .env("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
}

/// Runs the C++ program to completion (within a minute); its exit status
/// and output.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let mut child = sanitizer_env(&mut Command::new(program))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the C++ program");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A C++ server process, killed (by its own PID) when dropped.
struct CppServer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    vat: String,
}

impl CppServer {
    fn start(program: &Path, args: &[&str]) -> CppServer {
        let mut child = sanitizer_env(&mut Command::new(program))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the C++ server");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("LISTENING ") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let Ok(first) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("the C++ server did not start listening");
        };
        let mut parts = first.split_whitespace().skip(1);
        let port: u16 = parts.next().unwrap().parse().unwrap();
        let vat = parts.next().unwrap().to_string();
        CppServer {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            vat,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) for `n` lines starting with `prefix`; returns them.
    fn wait_for(&self, prefix: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<String> = self
                .lines()
                .into_iter()
                .filter(|l| l.starts_with(prefix))
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} {prefix:?} lines: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Key files (the CLI's format) in a temporary directory.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Generates and saves a key; returns it and its path.
    fn make(&self, name: &str) -> (Identity, String) {
        let id = Identity::generate();
        let path = self.dir.path().join(format!("{name}.key"));
        id.save(&path, false).unwrap();
        (id, path.to_str().unwrap().to_string())
    }

    fn allow_list(&self, vats: &[VatId]) -> String {
        let path = self.dir.path().join("allow");
        let text: String = vats.iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

/// Runs `f` on a fresh current-thread runtime inside a LocalSet.
fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Starts `rpc::serve` with the demo Office on a thread of its own, for the
/// life of the test process; returns its address.
fn rust_office_server(identity: Identity, allow: Vec<VatId>) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        local(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            rpc::serve(
                listener,
                identity,
                Arc::new(AllowList::from_vat_ids(allow)),
                ServerConfig::default(),
                Office::bootstrap,
            )
            .await;
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

/// A Rust responder for one connection, on a thread of its own: runs
/// `then` on the accepted stream (or the handshake's error).
fn rust_responder<T, F, Fut>(identity: Identity, then: F) -> (SocketAddr, mpsc::Receiver<T>)
where
    T: Send + 'static,
    F: FnOnce(Result<stream::NoiseStream<tokio::net::TcpStream>, Error>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let (addr_tx, addr_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        local(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let accepted =
                stream::accept(tcp, &identity, Arc::new(AnyVat), StreamConfig::default()).await;
            let _ = done_tx.send(then(accepted).await);
        })
    });
    (
        addr_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        done_rx,
    )
}

#[track_caller]
fn assert_line(out: &str, prefix: &str) {
    assert!(
        out.lines().any(|l| l.starts_with(prefix)),
        "no line starting with {prefix:?} in:\n{out}"
    );
}

/// The C++ client program of one build, with one key file.
struct CppClient<'a> {
    program: &'a Path,
    flavour: &'a str,
    key: &'a str,
}

impl CppClient<'_> {
    /// Runs a scenario against `addr`, pinning `vat`; it must succeed.
    #[track_caller]
    fn run(&self, addr: &dyn std::fmt::Display, vat: &str, scenario: &str) -> String {
        let addr = addr.to_string();
        let (ok, out) = run(self.program, &["client", &addr, vat, self.key, scenario]);
        assert!(ok, "{} {scenario}:\n{out}", self.flavour);
        out
    }

    /// Calls that see `whoami` as the caller, a 16 MiB echo, and 100
    /// sequential connections (`calls-anon`: no check of the caller).
    #[track_caller]
    fn calls(&self, addr: &dyn std::fmt::Display, vat: &str, whoami: &str) {
        let scenario = if whoami == "plain" {
            "calls-anon"
        } else {
            "calls"
        };
        let out = self.run(addr, vat, scenario);
        assert_line(&out, &format!("WHOAMI {whoami}"));
        assert_line(&out, "ECHO16M ok");
        assert_line(&out, "SEQ100 ok");
    }

    /// The server at `addr` is not `vat`: the client refuses it.
    #[track_caller]
    fn wrong_pin(&self, addr: &dyn std::fmt::Display, vat: &str) {
        let out = self.run(addr, vat, "wrongpin");
        assert_line(&out, "REFUSED capnp-noise: CNOISE_STATUS_PEER_REFUSED");
    }

    /// The server sends "hello" and cuts the stream: an error, not an end.
    #[track_caller]
    fn truncated(&self, addr: &dyn std::fmt::Display, vat: &str) {
        let out = self.run(addr, vat, "truncated");
        assert_line(&out, "READ hello");
        assert_line(&out, "TRUNCATED capnp-noise: CNOISE_STATUS_UNEXPECTED_EOF");
    }
}

#[test]
fn cpp_client_against_rust_serve() {
    each_build(|flavour, program| {
        let keys = Keys::new();
        let (server, _) = keys.make("server");
        let (client, client_key) = keys.make("client");
        let server_vat = server.vat_id().to_string();
        let addr = rust_office_server(server, vec![client.vat_id()]).to_string();

        let cpp = CppClient {
            program,
            flavour,
            key: &client_key,
        };
        cpp.calls(&addr, &server_vat, &client.vat_id().to_string());

        // A wrong pin: refused after message 2, so the responder never gets
        // message 3 (the client's identity).
        let (impostor, _) = keys.make("impostor");
        let (addr, done) = rust_responder(impostor, |r| async move { r.map(|s| s.peer_vat_id()) });
        cpp.wrong_pin(&addr, &server_vat);
        match done.recv_timeout(Duration::from_secs(10)).unwrap() {
            Err(Error::UnexpectedEof { during }) => {
                assert!(during.contains("message 3"), "{during}")
            }
            other => panic!("{flavour}: the impostor saw {other:?}"),
        }

        // A stream cut without CLOSE is an error at the C++ reader.
        let (server2, _) = keys.make("server2");
        let vat2 = server2.vat_id().to_string();
        let (addr, done) = rust_responder(server2, |r| async move {
            let mut s = r.expect("handshake");
            s.write_all(b"hello").await.unwrap();
            s.flush().await.unwrap();
            // Cut the TCP stream without the authenticated CLOSE.
            s.get_mut().shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = s.get_mut().read_to_end(&mut rest).await;
        });
        cpp.truncated(&addr, &vat2);
        done.recv_timeout(Duration::from_secs(10)).unwrap();

        // A server that never answers: the handshake times out.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let out = cpp.run(&silent_addr, &vat2, "timeout");
        assert_line(&out, "TIMEOUT capnp-noise: CNOISE_STATUS_HANDSHAKE_TIMEOUT");
        drop(silent);
    });
}

#[test]
fn rust_connect_against_cpp_server() {
    each_build(|flavour, program| {
        let keys = Keys::new();
        let (_, server_key) = keys.make("server");
        let (client, _) = keys.make("client");
        let (stranger, _) = keys.make("stranger");
        let allow = keys.allow_list(&[client.vat_id()]);
        let server = CppServer::start(program, &["server", &server_key, &allow]);
        let server_vat: VatId = server.vat.parse().unwrap();

        local(async {
            let pinned = Arc::new(Pinned(server_vat));
            let (office, conn): (office::Client, _) = rpc::connect(
                server.addr,
                &client,
                pinned.clone(),
                ClientConfig::default(),
            )
            .await
            .unwrap();
            let reply = office.whoami_request().send().promise.await.unwrap();
            let seen = reply
                .get()
                .unwrap()
                .get_vat_id()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            assert_eq!(seen, client.vat_id().to_string(), "{flavour}");
            let data: Vec<u8> = (0..SIXTEEN_MIB).map(|i| (i * 7 % 251) as u8).collect();
            let mut req = office.echo_request();
            req.get().set_data(&data);
            let reply = req.send().promise.await.unwrap();
            assert!(
                reply.get().unwrap().get_data().unwrap() == data.as_slice(),
                "{flavour}"
            );
            conn.disconnect().await.unwrap();

            for i in 0..100 {
                let (office, conn): (office::Client, _) = rpc::connect(
                    server.addr,
                    &client,
                    pinned.clone(),
                    ClientConfig::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("{flavour}: connection {i}: {e}"));
                office.whoami_request().send().promise.await.unwrap();
                conn.disconnect().await.unwrap();
            }

            // A vat off the allow-list: the server hangs up after message 3.
            let (office, _conn): (office::Client, _) = rpc::connect(
                server.addr,
                &stranger,
                pinned.clone(),
                ClientConfig::default(),
            )
            .await
            .unwrap();
            let Err(err) = office.whoami_request().send().promise.await else {
                panic!("{flavour}: a vat off the allow-list was served");
            };
            // The server closes with the client's first request unread, so
            // the client sees either the end of stream ("... may have
            // refused this vat's identity") or, by timing, a TCP reset.
            let err = err.to_string();
            assert!(
                err.contains("refused") || err.contains("reset"),
                "{flavour}: {err}"
            );

            // A wrong pin: the client refuses, the server never learns who it was.
            let wrong = Arc::new(Pinned(stranger.vat_id()));
            let r = rpc::connect::<_, office::Client>(
                server.addr,
                &client,
                wrong,
                ClientConfig::default(),
            )
            .await;
            match r {
                Err(Error::PeerRefused { .. }) => {}
                Err(e) => panic!("{flavour}: {e}"),
                Ok(_) => panic!("{flavour}: a wrong pin was accepted"),
            }
        });
        // Two failed handshakes: the stranger (refused by the allow-list), and
        // the refusing client, which hung up before message 3.
        let failures = server.wait_for("HANDSHAKE_FAILED", 2);
        let lines = server.lines();
        let connected = lines.iter().filter(|l| l.starts_with("CONNECTED ")).count();
        // 1 + 100 accepted connections; the stranger and the refusing client never "connected".
        assert_eq!(connected, 101, "{flavour}: {lines:?}");
        assert!(
            failures.iter().any(|l| l.contains("PEER_REFUSED")),
            "{flavour}: {failures:?}"
        );
        assert!(
            failures
                .iter()
                .any(|l| l.contains("UNEXPECTED_EOF") && l.contains("message 3")),
            "{flavour}: {failures:?}"
        );

        // A C++ stream cut without CLOSE is an error at the Rust reader.
        let cutter = CppServer::start(program, &["truncate-server", &server_key]);
        local(async {
            let tcp = tokio::net::TcpStream::connect(cutter.addr).await.unwrap();
            let mut s = stream::connect(tcp, &client, Arc::new(AnyVat), StreamConfig::default())
                .await
                .unwrap();
            let mut got = Vec::new();
            let err = s.read_to_end(&mut got).await.unwrap_err();
            assert_eq!(got, b"hello", "{flavour}");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::UnexpectedEof,
                "{flavour}: {err}"
            );
        });
    });
}

#[test]
fn cpp_against_cpp() {
    each_build(|flavour, program| {
        let keys = Keys::new();
        let (_, server_key) = keys.make("server");
        let (client, client_key) = keys.make("client");
        let (other, _) = keys.make("other");
        let server = CppServer::start(program, &["server", &server_key, "any"]);
        let cpp = CppClient {
            program,
            flavour,
            key: &client_key,
        };
        cpp.calls(&server.addr, &server.vat, &client.vat_id().to_string());
        cpp.wrong_pin(&server.addr, &other.vat_id().to_string());
        let failed = server.wait_for("HANDSHAKE_FAILED", 1).remove(0);
        assert!(
            failed.contains("UNEXPECTED_EOF") && failed.contains("message 3"),
            "{failed}"
        );
        let client_vat = client.vat_id().to_string();
        let connected = server
            .lines()
            .iter()
            .filter(|l| l.starts_with("CONNECTED ") && l.ends_with(client_vat.as_str()))
            .count();
        assert_eq!(
            connected, 101,
            "{flavour}: the refused attempt must not connect"
        );

        let cutter = CppServer::start(program, &["truncate-server", &server_key]);
        cpp.truncated(&cutter.addr, &cutter.vat);
    });
}

#[test]
fn cpp_through_the_tunnel() {
    use capnp_noise_tunnel::{Tunnel, TunnelConfig};
    each_build(|flavour, program| {
        let keys = Keys::new();
        let (tunnel_id, tunnel_key) = keys.make("tunnel");
        let (client, client_key) = keys.make("client");
        let (other, _) = keys.make("other");
        let (_, cloud_key) = keys.make("cloud");
        // `office`: a plain C++ Office server behind the tunnel's server
        // service, reached by the C++ adapter. `cloud`: the tunnel's client
        // service in front of a capnp-noise C++ server, reached by a plain
        // C++ client.
        let plain = CppServer::start(program, &["server", &tunnel_key, "plain"]);
        let cloud = CppServer::start(program, &["server", &cloud_key, "any"]);
        let config = keys.dir.path().join("tunnel.toml");
        std::fs::write(
            &config,
            format!(
                "identity = {tunnel_key:?}\n\n\
                 [service.office]\nmode = \"server\"\nlisten = \"127.0.0.1:0\"\n\
                 connect = \"{}\"\nallow_vat = [\"{}\"]\n\n\
                 [service.cloud]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\n\
                 connect = \"{}\"\npeer = \"{}\"\n",
                plain.addr,
                client.vat_id(),
                cloud.addr,
                cloud.vat,
            ),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<capnp_noise_tunnel::ShutdownHandle>();
        let runner = std::thread::spawn(move || {
            local(async move {
                let tunnel = Tunnel::new(TunnelConfig::load(&config).unwrap()).unwrap();
                let bound = tunnel.bind().await.unwrap();
                stop_tx.send(bound.shutdown_handle()).unwrap();
                tx.send(bound.listening()).unwrap();
                bound.run().await
            })
        });
        let listening = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let addr_of = |name: &str| {
            listening
                .iter()
                .find(|l| l.name == name)
                .unwrap_or_else(|| panic!("no service {name}"))
                .addr
                .clone()
        };
        let vat = tunnel_id.vat_id().to_string();
        let cpp = CppClient {
            program,
            flavour,
            key: &client_key,
        };
        cpp.calls(&addr_of("office"), &vat, "plain");
        cpp.wrong_pin(&addr_of("office"), &other.vat_id().to_string());

        // The C++ server sees the tunnel's VatId: a plain client with the
        // tunnel's key file runs the `calls` scenario, which checks that.
        let through = CppClient {
            program,
            flavour,
            key: &tunnel_key,
        };
        through.calls(&addr_of("cloud"), "plain", &vat);

        let stop = stop_rx.recv().unwrap();
        stop.abort();
        runner.join().unwrap();
    });
}

#[test]
fn the_cpp_example_runs() {
    let Some(b) = builds() else { return };
    let (ok, out) = run(&b.example, &[]);
    assert!(ok, "{out}");
    assert_line(&out, "office: 3 notifications delivered");
    assert_line(
        &out,
        "office: refused the impostor: capnp-noise: CNOISE_STATUS_PEER_REFUSED",
    );
}

#[test]
fn a_c_program_runs_a_session_through_the_header() {
    let Some(b) = builds() else { return };
    let (ok, out) = run(&b.c_session, &[]);
    assert!(ok, "{out}");
    assert_line(&out, "OK");
}

#[test]
fn the_adapter_reassembles_three_byte_reads() {
    each_build(|flavour, program| {
        let (ok, out) = run(program, &["trickle"]);
        assert!(ok, "{flavour}:\n{out}");
        assert_line(&out, "TRICKLE ok");
    });
}

// capnp-noise for C++: a kj::AsyncIoStream that runs capnp-noise (Noise XX
// with Ed25519 vat identities, SPEC.md) over another kj::AsyncIoStream, so
// that Cap'n Proto's own capnp::TwoPartyClient / TwoPartyServer /
// TwoPartyVatNetwork run over it unchanged.
//
// Built on the C ABI of crates/capnp-noise-c (include/capnp_noise.h): the
// protocol, the keys and the policies are the Rust library's; this file only
// moves bytes between kj streams and the sans-IO session.
//
//   auto io = kj::setupAsyncIo();
//   auto me = capnp_noise::Identity::load("client.key");
//   auto stream = capnp_noise::connect(io.provider->getNetwork(),
//       io.provider->getTimer(), "cloud.example:4000", me, "vat1...").wait(io.waitScope);
//   capnp::TwoPartyClient client(*stream);
//   auto office = client.bootstrap().castAs<Office>();
//
// Errors are kj::Exceptions whose description starts with
// "capnp-noise: CNOISE_STATUS_<NAME>: " and then the library's message.
// A byte stream that ends without the peer's authenticated CLOSE is
// reported as such an exception (CNOISE_STATUS_UNEXPECTED_EOF, type
// DISCONNECTED), never as a clean end of stream.

#pragma once

#include <kj/async-io.h>
#include <kj/function.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/timer.h>
#include <capnp/capability.h>
#include <capnp/rpc-twoparty.h>

#include <memory>

#include "capnp_noise.h"

namespace capnp_noise {

// Throws the kj::Exception that describes a failed call of the C ABI, or
// does nothing for CNOISE_STATUS_OK.
void check(CnoiseStatus status);

// A vat's secret identity: an Ed25519 key (the same key files as the
// `capnp-noise` command) and a fresh Noise static key it vouches for.
class Identity {
public:
  static Identity generate();
  // Loads a key file (PKCS#8 PEM or OpenSSH Ed25519).
  static Identity load(kj::StringPtr path);
  // Saves the key as PKCS#8 PEM, mode 0600; fails if the file exists
  // unless `overwrite`.
  void save(kj::StringPtr path, bool overwrite = false) const;
  // The VatId in text form ("vat1...", 59 characters).
  kj::String vatId() const;
  const CnoiseIdentity* get() const { return ptr.get(); }

private:
  struct Free { void operator()(CnoiseIdentity* p) const { cnoise_identity_free(p); } };
  explicit Identity(CnoiseIdentity* p): ptr(p, Free()) {}
  std::shared_ptr<CnoiseIdentity> ptr;
};

// Who may be on the other end. Copies share one policy; every handshake
// keeps the policy (and a callback's function) alive until it ends.
class Policy {
public:
  // Any vat that proves its identity; the application looks at the VatId.
  static Policy any();
  // Exactly one VatId (text form). A pinned initiator refuses any other
  // responder before it sends its own identity.
  static Policy pinned(kj::StringPtr vatId);
  // The VatIds of an allow-list file (one per line, `#` comments), re-read
  // when the file changes.
  static Policy allowListFile(kj::StringPtr path);
  // `accept(peerVatId)` decides. It runs inside the handshake, on the
  // event loop's thread, and must not throw.
  static Policy callback(kj::Function<bool(kj::StringPtr peerVatId)> accept);

  const CnoisePolicy* get() const;

  // The C policy and a callback's function (internal).
  struct State;
  // Handshakes keep it (and a callback's function) alive (internal).
  const std::shared_ptr<State>& shared() const { return state; }

private:
  explicit Policy(std::shared_ptr<State> state): state(kj::mv(state)) {}
  std::shared_ptr<State> state;
  friend class NoiseStream;
};

// An established capnp-noise session over an inner stream.
//
// Reads return plaintext; a read returns 0 (end of stream) only after the
// peer's authenticated CLOSE, and throws if the inner stream ends before it.
// Each write is sealed and written out before its promise resolves (no
// buffering between writes). shutdownWrite() sends the authenticated CLOSE
// and then shuts down the inner stream's write side; end() does the same
// and lets the caller wait for it.
class NoiseStream final: public kj::AsyncIoStream {
public:
  // Runs the handshake as the initiator (the side that connected) over
  // `inner`. `policy` judges the responder; if it refuses, this side's
  // identity is never sent and the promise fails with
  // CNOISE_STATUS_PEER_REFUSED.
  static kj::Promise<kj::Own<NoiseStream>> connect(
      kj::Own<kj::AsyncIoStream> inner, const Identity& identity, const Policy& policy);
  // Runs the handshake as the responder (the side that accepted).
  static kj::Promise<kj::Own<NoiseStream>> accept(
      kj::Own<kj::AsyncIoStream> inner, const Identity& identity, const Policy& policy);

  ~NoiseStream() noexcept(false);
  KJ_DISALLOW_COPY(NoiseStream);

  // The peer's authenticated VatId, text form.
  kj::StringPtr peerVatId() const { return peer; }
  // The handshake hash (32 bytes, the same on both sides): channel binding.
  kj::ArrayPtr<const kj::byte> handshakeHash() const { return hash; }

  // Sends the authenticated CLOSE (after everything written before), then
  // shuts down the inner stream's write side. Reading continues until the
  // peer's CLOSE. Calling it again returns at once.
  kj::Promise<void> end();

  // kj::AsyncIoStream
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  // The authenticated close, started now and finished in the background
  // (kj's shutdownWrite() cannot wait): see end().
  void shutdownWrite() override;
  void abortRead() override;
  void getsockopt(int level, int option, void* value, kj::uint* length) override;
  void setsockopt(int level, int option, const void* value, kj::uint length) override;
  void getsockname(struct sockaddr* addr, kj::uint* length) override;
  void getpeername(struct sockaddr* addr, kj::uint* length) override;

  struct SessionFree { void operator()(CnoiseSession* s) const { cnoise_session_free(s); } };
  using SessionPtr = std::unique_ptr<CnoiseSession, SessionFree>;
  // Used by the handshake; applications use connect() and accept().
  NoiseStream(kj::Own<kj::AsyncIoStream> inner, SessionPtr session,
              kj::Array<kj::byte> surplus);

private:
  kj::Own<kj::AsyncIoStream> inner;  // first: outlives the promises below
  SessionPtr session;
  kj::String peer;
  kj::Array<kj::byte> hash;
  kj::Array<kj::byte> rx;  // ciphertext read from `inner` but not yet fed
  size_t rxPos = 0, rxEnd = 0;
  bool writing = false;
  bool ended = false;
  kj::Maybe<kj::ForkedPromise<void>> closing;  // end(): the CLOSE, then the inner shutdownWrite()
  kj::Maybe<kj::Promise<void>> closeTask;      // shutdownWrite(): end(), run in the background

  kj::Promise<size_t> readLoop(kj::byte* buffer, size_t minBytes, size_t maxBytes, size_t got);
  kj::Promise<void> writePieces(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces,
                                size_t index, size_t offset);
  kj::Promise<void> drain();
};

// The default bound on a handshake (connect and accept helpers).
constexpr kj::Duration DEFAULT_HANDSHAKE_TIMEOUT = 10 * kj::SECONDS;

// Connects to `address` ("host:port") and runs the handshake, pinning the
// server's VatId `serverVatId`; the TCP connect and the handshake together
// must finish within `timeout` (else CNOISE_STATUS_HANDSHAKE_TIMEOUT).
kj::Promise<kj::Own<NoiseStream>> connect(
    kj::Network& network, kj::Timer& timer, kj::StringPtr address,
    const Identity& identity, kj::StringPtr serverVatId,
    kj::Duration timeout = DEFAULT_HANDSHAKE_TIMEOUT);

// A Server's limits on unauthenticated peers: SPEC.md 8.1 (admission),
// with the defaults and names of the Rust `rpc::ServerConfig`.
//
// A responder does no public-key work for a connection before its preamble
// and a well-formed message 1 have arrived, and bounds how many handshakes
// are past message 1 at once, in total and per source address (an IPv4
// address or an IPv6 /64): a message 1 that finds its source's share or all
// slots taken waits, unanswered, first come first served, within the
// handshake timeout. While it waits nothing is computed, and a peer that
// hangs up meanwhile is dropped without taking a slot. A handshake that fails
// after admission keeps its slot for `handshakeFailureHold`, so peers that
// send message 1 and hang up cannot make the server answer message 1 at the
// rate they open connections. Before message 1 a connection costs a socket:
// one source may have at most `maxUnauthenticatedPerSource` of them (more
// are closed at accept), each must deliver message 1 within
// `firstMessageTimeout`, and `listen()` accepts at most `maxConnections`
// connections at once (more wait in the listen backlog).
struct ServerConfig {
  // From accept to admission; then again from admission to the end of the
  // handshake (CNOISE_STATUS_HANDSHAKE_TIMEOUT; the connection is closed).
  kj::Duration handshakeTimeout = DEFAULT_HANDSHAKE_TIMEOUT;
  // From accept to the end of message 1.
  kj::Duration firstMessageTimeout = 3 * kj::SECONDS;
  // Handshakes past message 1 at once (zero counts as one).
  size_t maxHandshakes = 64;
  // Of those, from one source address (zero counts as one).
  size_t maxHandshakesPerSource = 16;
  // How long a handshake that fails after admission keeps its slot (and
  // its source's share). Zero gives it back at once, which leaves the rate
  // of failing handshakes unbounded.
  kj::Duration handshakeFailureHold = 1 * kj::SECONDS;
  // Connections from one source between accept and the end of their
  // handshake (zero counts as one).
  size_t maxUnauthenticatedPerSource = 64;
  // Connections open at once, handshaking or established, through listen().
  size_t maxConnections = 1024;
};

// What a Server's admission has done so far (Server::stats()).
struct AdmissionStats {
  size_t inProgress = 0;      // handshakes holding a slot now (at most maxHandshakes)
  size_t peakInProgress = 0;  // the most that ever held one at once
  uint64_t admitted = 0;      // handshakes given a slot
  uint64_t waited = 0;        // of those, how many had to wait for it
  uint64_t heldAfterFailure = 0;  // of those, how many failed and kept it for the hold
  uint64_t refusedAtAccept = 0;   // connections closed at once: their source had too many
  size_t connections = 0;     // connections open through listen()
};

// A Cap'n Proto server over capnp-noise: each accepted connection runs the
// handshake under the admission rules of `ServerConfig` (the policy decides
// who may connect), then a capnp::TwoPartyServer whose bootstrap capability
// `bootstrap(peerVatId)` builds for that caller, as the Rust `rpc::serve`
// does.
class Server final: private kj::TaskSet::ErrorHandler {
public:
  using BootstrapFactory = kj::Function<capnp::Capability::Client(kj::StringPtr peerVatId)>;
  // Called for every connection whose handshake failed (refused, timed
  // out, broken), with the exception; the default logs it. Not called for
  // connections closed at accept (see AdmissionStats::refusedAtAccept).
  using FailureHandler = kj::Function<void(kj::Exception&&)>;

  Server(kj::Timer& timer, Identity identity, Policy policy, BootstrapFactory bootstrap,
         ServerConfig config = ServerConfig());
  // Only the handshake timeout differs from the defaults.
  Server(kj::Timer& timer, Identity identity, Policy policy, BootstrapFactory bootstrap,
         kj::Duration handshakeTimeout);
  ~Server() noexcept(false);
  KJ_DISALLOW_COPY(Server);

  void onHandshakeFailure(FailureHandler handler) { failureHandler = kj::mv(handler); }

  // Accepts connections from `listener` forever, at most
  // `maxConnections` open at once.
  kj::Promise<void> listen(kj::ConnectionReceiver& listener);
  // Serves one connection (already accepted): the same admission rules,
  // except that it does not count towards `maxConnections`.
  void accept(kj::Own<kj::AsyncIoStream> connection);
  // Resolves when no connection is open.
  kj::Promise<void> drain() { return tasks.onEmpty(); }

  AdmissionStats stats() const;

  // The admission state, and a connection's place among maxConnections (internal).
  struct Admission;
  struct Place;

private:
  kj::Timer& timer;
  Identity identity;
  Policy policy;
  BootstrapFactory bootstrap;
  ServerConfig config;
  kj::Maybe<FailureHandler> failureHandler;
  kj::Own<Admission> admission;  // before the tasks: they hold its slots
  kj::TaskSet tasks;

  void serve(kj::Own<kj::AsyncIoStream> connection, kj::Maybe<kj::Own<Place>> place);
  kj::Promise<void> listenLoop(kj::ConnectionReceiver& listener);
  void taskFailed(kj::Exception&& exception) override;
};

}  // namespace capnp_noise

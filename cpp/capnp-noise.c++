// capnp-noise for C++: see capnp-noise.h.

#include "capnp-noise.h"

#include <kj/debug.h>

namespace capnp_noise {

void check(CnoiseStatus status) {
  if (status == CNOISE_STATUS_OK) return;
  // The end of the byte stream (or its failure) is a disconnection; every
  // other failure (a refused peer, tampering, a protocol violation) is not
  // something a retry on the same connection can fix.
  auto type = status == CNOISE_STATUS_UNEXPECTED_EOF || status == CNOISE_STATUS_IO
      ? kj::Exception::Type::DISCONNECTED
      : kj::Exception::Type::FAILED;
  kj::throwFatalException(kj::Exception(type, __FILE__, __LINE__,
      kj::str("capnp-noise: ", cnoise_status_name(status), ": ", cnoise_last_error_message())));
}

// ----- identities and policies ----------------------------------------------

Identity Identity::generate() {
  CnoiseIdentity* p = nullptr;
  check(cnoise_identity_generate(&p));
  return Identity(p);
}

Identity Identity::load(kj::StringPtr path) {
  CnoiseIdentity* p = nullptr;
  check(cnoise_identity_load(path.cStr(), &p));
  return Identity(p);
}

void Identity::save(kj::StringPtr path, bool overwrite) const {
  check(cnoise_identity_save(ptr.get(), path.cStr(), overwrite));
}

kj::String Identity::vatId() const {
  char buf[CNOISE_VAT_ID_TEXT_SIZE];
  check(cnoise_identity_vat_id(ptr.get(), buf, sizeof(buf)));
  return kj::heapString(buf);
}

struct Policy::State {
  CnoisePolicy* policy = nullptr;
  // The callback of Policy::callback(), at a stable address (its user_data).
  kj::Maybe<kj::Own<kj::Function<bool(kj::StringPtr)>>> callback;

  State() = default;
  KJ_DISALLOW_COPY(State);
  ~State() { cnoise_policy_free(policy); }
};

namespace {

std::shared_ptr<Policy::State> newState() { return std::make_shared<Policy::State>(); }

// Called by the Rust handshake: it must not unwind, so an exception refuses.
bool callPolicy(void* userData, const char* peerVatId) noexcept {
  auto& fn = *static_cast<kj::Function<bool(kj::StringPtr)>*>(userData);
  bool accepted = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { accepted = fn(kj::StringPtr(peerVatId)); })) {
    KJ_LOG(ERROR, "capnp-noise: the policy callback threw; the peer is refused", *e);
    return false;
  }
  return accepted;
}

}  // namespace

const CnoisePolicy* Policy::get() const { return state->policy; }

Policy Policy::any() {
  auto s = newState();
  check(cnoise_policy_any(&s->policy));
  return Policy(kj::mv(s));
}

Policy Policy::pinned(kj::StringPtr vatId) {
  auto s = newState();
  check(cnoise_policy_pinned(vatId.cStr(), &s->policy));
  return Policy(kj::mv(s));
}

Policy Policy::allowListFile(kj::StringPtr path) {
  auto s = newState();
  check(cnoise_policy_allow_list_file(path.cStr(), &s->policy));
  return Policy(kj::mv(s));
}

Policy Policy::callback(kj::Function<bool(kj::StringPtr peerVatId)> accept) {
  auto s = newState();
  auto fn = kj::heap<kj::Function<bool(kj::StringPtr)>>(kj::mv(accept));
  check(cnoise_policy_callback(&callPolicy, fn.get(), &s->policy));
  s->callback = kj::mv(fn);
  return Policy(kj::mv(s));
}

// ----- the handshake --------------------------------------------------------

namespace {

struct HandshakeFree {
  void operator()(CnoiseHandshake* h) const { cnoise_handshake_free(h); }
};

// One handshake in progress: the inner stream, the sans-IO handshake and
// the bytes read but not yet fed to it.
struct Handshaker {
  kj::Own<kj::AsyncIoStream> inner;
  std::unique_ptr<CnoiseHandshake, HandshakeFree> hs;
  std::shared_ptr<Policy::State> policy;  // keeps a callback alive
  kj::Array<kj::byte> buf = kj::heapArray<kj::byte>(CNOISE_MAX_WIRE_FRAME);
  size_t pos = 0, end = 0;
};

// Sends what the handshake has to send, then feeds it what was read, then
// reads more; until it has finished.
kj::Promise<kj::Own<NoiseStream>> step(kj::Own<Handshaker> h) {
  for (;;) {
    const uint8_t* data = nullptr;
    size_t len = 0;
    check(cnoise_handshake_pending_output(h->hs.get(), &data, &len));
    if (len > 0) {
      // `data` stays valid: nothing calls into the handshake until the write is done.
      auto written = h->inner->write(data, len);
      return written.then([h = kj::mv(h), len]() mutable {
        check(cnoise_handshake_consume_output(h->hs.get(), len));
        return step(kj::mv(h));
      });
    }
    if (cnoise_handshake_is_finished(h->hs.get())) {
      CnoiseSession* s = nullptr;
      check(cnoise_handshake_into_session(h->hs.release(), &s));
      NoiseStream::SessionPtr session(s);
      // Bytes the peer sent after its last handshake message belong to the session.
      auto surplus = kj::heapArray<kj::byte>(h->buf.slice(h->pos, h->end));
      return kj::heap<NoiseStream>(kj::mv(h->inner), kj::mv(session), kj::mv(surplus));
    }
    if (h->pos < h->end) {
      size_t taken = 0;
      check(cnoise_handshake_feed(h->hs.get(), h->buf.begin() + h->pos, h->end - h->pos, &taken));
      h->pos += taken;
      KJ_ASSERT(taken > 0 || cnoise_handshake_is_finished(h->hs.get()),
                "capnp-noise: the handshake took no input");
      continue;
    }
    auto& inner = *h->inner;
    auto read = inner.tryRead(h->buf.begin(), 1, h->buf.size());
    return read.then([h = kj::mv(h)](size_t n) mutable {
      if (n == 0) {
        check(cnoise_handshake_feed_eof(h->hs.get()));
        KJ_FAIL_ASSERT("capnp-noise: the stream ended during the handshake");
      }
      h->pos = 0;
      h->end = n;
      return step(kj::mv(h));
    });
  }
}

kj::Promise<kj::Own<NoiseStream>> handshake(kj::Own<kj::AsyncIoStream> inner,
                                            const Identity& identity, const Policy& policy,
                                            std::shared_ptr<Policy::State> state, bool initiator) {
  return kj::evalNow([&]() {
    CnoiseHandshake* hs = nullptr;
    check(initiator ? cnoise_handshake_initiator(identity.get(), policy.get(), &hs)
                    : cnoise_handshake_responder(identity.get(), policy.get(), &hs));
    auto h = kj::heap<Handshaker>();
    h->inner = kj::mv(inner);
    h->hs.reset(hs);
    h->policy = kj::mv(state);
    return step(kj::mv(h));
  });
}

}  // namespace

kj::Promise<kj::Own<NoiseStream>> NoiseStream::connect(
    kj::Own<kj::AsyncIoStream> inner, const Identity& identity, const Policy& policy) {
  return handshake(kj::mv(inner), identity, policy, policy.state, true);
}

kj::Promise<kj::Own<NoiseStream>> NoiseStream::accept(
    kj::Own<kj::AsyncIoStream> inner, const Identity& identity, const Policy& policy) {
  return handshake(kj::mv(inner), identity, policy, policy.state, false);
}

// ----- the session ----------------------------------------------------------

NoiseStream::NoiseStream(kj::Own<kj::AsyncIoStream> innerParam, SessionPtr sessionParam,
                         kj::Array<kj::byte> surplus)
    : inner(kj::mv(innerParam)), session(kj::mv(sessionParam)),
      hash(kj::heapArray<kj::byte>(CNOISE_HANDSHAKE_HASH_LEN)),
      rx(kj::heapArray<kj::byte>(CNOISE_MAX_WIRE_FRAME)) {
  char vat[CNOISE_VAT_ID_TEXT_SIZE];
  check(cnoise_session_peer_vat_id(session.get(), vat, sizeof(vat)));
  peer = kj::heapString(vat);
  check(cnoise_session_handshake_hash(session.get(), hash.begin()));
  KJ_ASSERT(surplus.size() <= rx.size());
  memcpy(rx.begin(), surplus.begin(), surplus.size());
  rxEnd = surplus.size();
}

NoiseStream::~NoiseStream() noexcept(false) {}

kj::Promise<size_t> NoiseStream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  return kj::evalNow([&]() {
    return readLoop(static_cast<kj::byte*>(buffer), kj::max(minBytes, size_t(1)), maxBytes, 0);
  });
}

kj::Promise<size_t> NoiseStream::readLoop(kj::byte* buffer, size_t minBytes, size_t maxBytes,
                                          size_t got) {
  while (got < maxBytes) {
    CnoiseReadOutcome outcome = CNOISE_READ_OUTCOME_NEED_INPUT;
    size_t n = 0;
    // Throws on truncation (the inner stream ended before the peer's
    // CLOSE), tampering and protocol violations: never a silent end.
    check(cnoise_session_read(session.get(), buffer + got, maxBytes - got, &outcome, &n));
    if (outcome == CNOISE_READ_OUTCOME_DATA) {
      got += n;
      if (got >= minBytes) return got;
      continue;
    }
    if (outcome == CNOISE_READ_OUTCOME_CLOSED) return got;  // the authenticated end
    if (rxPos < rxEnd) {
      size_t taken = 0;
      check(cnoise_session_feed(session.get(), rx.begin() + rxPos, rxEnd - rxPos, &taken));
      KJ_ASSERT(taken > 0, "capnp-noise: the session took no input while it needed input");
      rxPos += taken;
      continue;
    }
    if (got >= minBytes) return got;
    auto read = inner->tryRead(rx.begin(), 1, rx.size());
    return read.then([this, buffer, minBytes, maxBytes, got](size_t n) {
      if (n == 0) check(cnoise_session_feed_eof(session.get()));
      rxPos = 0;
      rxEnd = n;
      return readLoop(buffer, minBytes, maxBytes, got);
    });
  }
  return got;
}

kj::Promise<void> NoiseStream::write(const void* buffer, size_t size) {
  auto pieces = kj::heapArray<kj::ArrayPtr<const kj::byte>>(1);
  pieces[0] = kj::arrayPtr(static_cast<const kj::byte*>(buffer), size);
  auto ptr = pieces.asPtr();
  return write(ptr).attach(kj::mv(pieces));
}

kj::Promise<void> NoiseStream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return kj::evalNow([&]() {
    KJ_REQUIRE(!writing, "capnp-noise: a write while another write is in progress");
    KJ_REQUIRE(!ended, "capnp-noise: a write after shutdownWrite() or end()");
    writing = true;
    return writePieces(pieces, 0, 0).then([this]() { writing = false; });
  });
}

kj::Promise<void> NoiseStream::writePieces(
    kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces, size_t index, size_t offset) {
  for (; index < pieces.size(); ++index, offset = 0) {
    auto piece = pieces[index];
    while (offset < piece.size()) {
      size_t accepted = 0;
      check(cnoise_session_write(session.get(), piece.begin() + offset, piece.size() - offset,
                                 &accepted));
      offset += accepted;
      if (accepted == 0) {
        // The session holds a sealed frame: write it out, then go on.
        const uint8_t* data = nullptr;
        size_t len = 0;
        check(cnoise_session_pending_output(session.get(), &data, &len));
        KJ_ASSERT(len > 0, "capnp-noise: the session accepted nothing and has nothing to send");
        return drain().then([this, pieces, index, offset]() {
          return writePieces(pieces, index, offset);
        });
      }
    }
  }
  check(cnoise_session_flush(session.get()));
  return drain();
}

kj::Promise<void> NoiseStream::drain() {
  const uint8_t* data = nullptr;
  size_t len = 0;
  check(cnoise_session_pending_output(session.get(), &data, &len));
  if (len == 0) return kj::READY_NOW;
  // `data` stays valid until it is consumed: only one write (or the close)
  // runs at a time, and reading never touches the session's output.
  return inner->write(data, len).then([this, len]() {
    check(cnoise_session_consume_output(session.get(), len));
    return drain();
  });
}

kj::Promise<void> NoiseStream::end() {
  KJ_IF_MAYBE(c, closing) {
    return c->addBranch();
  }
  auto close = kj::evalNow([this]() {
    KJ_REQUIRE(!writing, "capnp-noise: end() or shutdownWrite() while a write is in progress");
    ended = true;
    check(cnoise_session_close(session.get()));
    return drain().then([this]() { inner->shutdownWrite(); });
  });
  auto& fork = closing.emplace(close.fork());
  return fork.addBranch();
}

void NoiseStream::shutdownWrite() {
  if (closeTask != nullptr) return;
  closeTask = end().eagerlyEvaluate([](kj::Exception&& e) {
    // A peer that already hung up cannot get our CLOSE, and needs none.
    if (e.getType() != kj::Exception::Type::DISCONNECTED) {
      KJ_LOG(WARNING, "capnp-noise: sending the authenticated close failed", e);
    }
  });
}

kj::Promise<void> NoiseStream::whenWriteDisconnected() { return inner->whenWriteDisconnected(); }

void NoiseStream::abortRead() { inner->abortRead(); }

void NoiseStream::getsockopt(int level, int option, void* value, kj::uint* length) {
  inner->getsockopt(level, option, value, length);
}

void NoiseStream::setsockopt(int level, int option, const void* value, kj::uint length) {
  inner->setsockopt(level, option, value, length);
}

void NoiseStream::getsockname(struct sockaddr* addr, kj::uint* length) {
  inner->getsockname(addr, length);
}

void NoiseStream::getpeername(struct sockaddr* addr, kj::uint* length) {
  inner->getpeername(addr, length);
}

// ----- helpers ----------------------------------------------------------------

namespace {

// `promise`, failed with CNOISE_STATUS_HANDSHAKE_TIMEOUT after `timeout`.
kj::Promise<kj::Own<NoiseStream>> handshakeWithin(
    kj::Timer& timer, kj::Duration timeout, kj::Promise<kj::Own<NoiseStream>> promise) {
  return promise.exclusiveJoin(
      timer.afterDelay(timeout).then([]() -> kj::Promise<kj::Own<NoiseStream>> {
        return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
            kj::str("capnp-noise: ", cnoise_status_name(CNOISE_STATUS_HANDSHAKE_TIMEOUT),
                    ": the connection and its handshake did not complete in time"));
      }));
}

}  // namespace

kj::Promise<kj::Own<NoiseStream>> connect(
    kj::Network& network, kj::Timer& timer, kj::StringPtr address, const Identity& identity,
    kj::StringPtr serverVatId, kj::Duration timeout) {
  return kj::evalNow([&]() {
    auto policy = Policy::pinned(serverVatId);
    auto connected = network.parseAddress(address).then([](kj::Own<kj::NetworkAddress> addr) {
      auto tcp = addr->connect();
      return tcp.attach(kj::mv(addr));
    });
    auto stream = connected.then([identity, policy](kj::Own<kj::AsyncIoStream> tcp) {
      return NoiseStream::connect(kj::mv(tcp), identity, policy);
    });
    return handshakeWithin(timer, timeout, kj::mv(stream));
  });
}

Server::Server(kj::Timer& timer, Identity identity, Policy policy, BootstrapFactory bootstrap,
               kj::Duration handshakeTimeout)
    : timer(timer), identity(kj::mv(identity)), policy(kj::mv(policy)),
      bootstrap(kj::mv(bootstrap)), handshakeTimeout(handshakeTimeout), tasks(*this) {}

kj::Promise<void> Server::listen(kj::ConnectionReceiver& listener) {
  return listener.accept().then([this, &listener](kj::Own<kj::AsyncIoStream>&& connection) {
    accept(kj::mv(connection));
    return listen(listener);
  });
}

void Server::accept(kj::Own<kj::AsyncIoStream> connection) {
  auto handshake = handshakeWithin(
      timer, handshakeTimeout, NoiseStream::accept(kj::mv(connection), identity, policy));
  tasks.add(handshake.then(
      [this](kj::Own<NoiseStream> stream) -> kj::Promise<void> {
        // Each connection gets its own TwoPartyServer, so that its bootstrap
        // capability can depend on who is calling.
        auto server = kj::heap<capnp::TwoPartyServer>(bootstrap(stream->peerVatId()));
        server->accept(kj::mv(stream));
        auto done = server->drain();
        return done.attach(kj::mv(server));
      },
      [this](kj::Exception&& e) {
        KJ_IF_MAYBE(handler, failureHandler) {
          (*handler)(kj::mv(e));
        } else {
          KJ_LOG(WARNING, "capnp-noise: handshake failed", e);
        }
      }));
}

void Server::taskFailed(kj::Exception&& exception) {
  KJ_LOG(ERROR, "capnp-noise: connection failed", exception);
}

}  // namespace capnp_noise

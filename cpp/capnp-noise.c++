// capnp-noise for C++: see capnp-noise.h.

#include "capnp-noise.h"

#include <kj/debug.h>

#include <sys/socket.h>
#include <netinet/in.h>

#include <cstring>
#include <deque>
#include <map>
#include <string>

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

// What a Server's admission (below) does with one responder's handshake.
class Gate {
public:
  // The preamble and a well-formed message 1 have arrived.
  virtual void receivedMessage1() = 0;
  // Resolves once the handshake holds a slot (waits first come, first served).
  virtual kj::Promise<void> slot() = 0;
  // Message 1 is being answered: the public-key work starts.
  virtual void admitted() = 0;

protected:
  ~Gate() = default;
};

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
  kj::Maybe<Gate&> gate;  // a Server's responder: admission (SPEC.md 8.1)
  bool toldMessage1 = false;
};

kj::Promise<kj::Own<NoiseStream>> step(kj::Own<Handshaker> h);

// While message 1 waits for a slot: one read, to notice a peer that hangs
// up (its handshake then ends without a slot: no public-key work was done
// for it). Bytes it reads are kept for after admission; nothing more is read.
kj::Promise<void> watchForEnd(Handshaker& h) {
  if (h.pos > 0) {
    memmove(h.buf.begin(), h.buf.begin() + h.pos, h.end - h.pos);
    h.end -= h.pos;
    h.pos = 0;
  }
  if (h.end == h.buf.size()) return kj::NEVER_DONE;
  return h.inner->tryRead(h.buf.begin() + h.end, 1, h.buf.size() - h.end)
      .then([&h](size_t n) -> kj::Promise<void> {
        if (n == 0) {
          check(cnoise_handshake_feed_eof(h.hs.get()));
          KJ_FAIL_ASSERT("capnp-noise: the stream ended while message 1 waited for admission");
        }
        h.end += n;
        return kj::NEVER_DONE;  // it is still there: wait for the slot
      });
}

// Waits for a slot (or the peer's end), then answers message 1.
kj::Promise<kj::Own<NoiseStream>> admit(kj::Own<Handshaker> h, Gate& gate) {
  // evalLast: an end of stream already received wins over a free slot, so
  // a peer that hung up costs no Diffie-Hellman work.
  auto slot = gate.slot().then([]() { return kj::evalLast([]() {}); });
  auto watched = slot.exclusiveJoin(watchForEnd(*h));
  // `h` outlives the read above: a promise drops its dependency before its function.
  return watched.then([h = kj::mv(h), &gate]() mutable {
    check(cnoise_handshake_admit(h->hs.get()));
    gate.admitted();
    return step(kj::mv(h));
  });
}

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
    KJ_IF_MAYBE(gate, h->gate) {
      if (!h->toldMessage1 && cnoise_handshake_received_message_1(h->hs.get())) {
        h->toldMessage1 = true;
        gate->receivedMessage1();
      }
      if (cnoise_handshake_awaits_admission(h->hs.get())) return admit(kj::mv(h), *gate);
    }
    if (h->pos < h->end) {
      size_t taken = 0;
      check(cnoise_handshake_feed(h->hs.get(), h->buf.begin() + h->pos, h->end - h->pos, &taken));
      h->pos += taken;
      KJ_ASSERT(taken > 0 || cnoise_handshake_is_finished(h->hs.get()) ||
                    cnoise_handshake_awaits_admission(h->hs.get()),
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
                                            std::shared_ptr<Policy::State> state, bool initiator,
                                            kj::Maybe<Gate&> gate = nullptr) {
  return kj::evalNow([&]() {
    CnoiseHandshake* hs = nullptr;
    check(initiator ? cnoise_handshake_initiator(identity.get(), policy.get(), &hs)
                    : cnoise_handshake_responder(identity.get(), policy.get(), &hs));
    auto h = kj::heap<Handshaker>();
    h->inner = kj::mv(inner);
    h->hs.reset(hs);
    h->policy = kj::mv(state);
    if (gate != nullptr) check(cnoise_handshake_require_admission(hs));
    h->gate = gate;
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

namespace {

// A Server's responder: NoiseStream::accept with admission.
kj::Promise<kj::Own<NoiseStream>> handshakeResponder(
    kj::Own<kj::AsyncIoStream> inner, const Identity& identity, const Policy& policy, Gate& gate) {
  return handshake(kj::mv(inner), identity, policy, policy.shared(), false, gate);
}

}  // namespace

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
    return writePieces(pieces, 0, 0);
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
  // Everything is sealed: one write of the pending output (usually one
  // frame) and one continuation per write() (no drain() loop).
  const uint8_t* data = nullptr;
  size_t len = 0;
  check(cnoise_session_pending_output(session.get(), &data, &len));
  if (len == 0) {
    writing = false;
    return kj::READY_NOW;
  }
  // `data` stays valid until it is consumed: only one write (or the close)
  // runs at a time, and reading never touches the session's output.
  return inner->write(data, len).then([this, len]() {
    check(cnoise_session_consume_output(session.get(), len));
    writing = false;
  });
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

// ----- the server and its admission (SPEC.md 8.1) ------------------------------

namespace {

kj::Exception handshakeTimeout(kj::StringPtr what) {
  return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
      kj::str("capnp-noise: ", cnoise_status_name(CNOISE_STATUS_HANDSHAKE_TIMEOUT), ": ", what));
}

// A counting semaphore whose waiters are served in order of arrival. A
// waiter that gave up (its promise was dropped) is skipped; a permit handed
// to a waiter that gives up before using it is given back by its destructor.
class Semaphore {
public:
  class Permit {
  public:
    explicit Permit(Semaphore& semaphore): semaphore(semaphore) { ++semaphore.held; }
    ~Permit() noexcept(false) { semaphore.release(); }
    KJ_DISALLOW_COPY(Permit);

  private:
    Semaphore& semaphore;
  };

  explicit Semaphore(size_t limit): limit(kj::max(limit, size_t(1))) {}
  KJ_DISALLOW_COPY(Semaphore);

  kj::Maybe<kj::Own<Permit>> tryAcquire() {
    while (!waiters.empty() && !waiters.front()->isWaiting()) waiters.pop_front();
    if (held >= limit || !waiters.empty()) return nullptr;
    return kj::heap<Permit>(*this);
  }

  kj::Promise<kj::Own<Permit>> acquire() {
    KJ_IF_MAYBE(permit, tryAcquire()) {
      return kj::mv(*permit);
    }
    auto paf = kj::newPromiseAndFulfiller<kj::Own<Permit>>();
    waiters.push_back(kj::mv(paf.fulfiller));
    return kj::mv(paf.promise);
  }

  size_t inUse() const { return held; }

private:
  size_t limit;
  size_t held = 0;
  std::deque<kj::Own<kj::PromiseFulfiller<kj::Own<Permit>>>> waiters;

  void release() {
    --held;
    while (!waiters.empty()) {
      auto next = kj::mv(waiters.front());
      waiters.pop_front();
      if (next->isWaiting()) {
        next->fulfill(kj::heap<Permit>(*this));
        return;
      }
    }
  }
};

// The unit a per-source limit counts: an IPv4 address ("4" and its bytes), or
// an IPv6 /64 ("6" and the prefix); IPv4-mapped IPv6 counts as IPv4. Null for
// anything else (Unix sockets, pipes, streams without an address): then only
// the total limits apply.
kj::Maybe<std::string> sourceOf(kj::AsyncIoStream& stream) {
  struct sockaddr_storage addr;
  memset(&addr, 0, sizeof(addr));
  kj::uint len = sizeof(addr);
  if (kj::runCatchingExceptions([&]() {
        stream.getpeername(reinterpret_cast<struct sockaddr*>(&addr), &len);
      }) != nullptr) {
    return nullptr;
  }
  if (addr.ss_family == AF_INET) {
    auto& in = *reinterpret_cast<struct sockaddr_in*>(&addr);
    return std::string("4") + std::string(reinterpret_cast<const char*>(&in.sin_addr), 4);
  }
  if (addr.ss_family == AF_INET6) {
    auto& in6 = *reinterpret_cast<struct sockaddr_in6*>(&addr);
    const auto* b = reinterpret_cast<const char*>(&in6.sin6_addr);
    static const char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\xff', '\xff'};
    if (memcmp(b, mapped, 12) == 0) return std::string("4") + std::string(b + 12, 4);
    return std::string("6") + std::string(b, 8);
  }
  return nullptr;
}

}  // namespace

struct Server::Place {
  explicit Place(kj::Own<Semaphore::Permit> permit): permit(kj::mv(permit)) {}
  kj::Own<Semaphore::Permit> permit;
};

struct Server::Admission final: private kj::TaskSet::ErrorHandler {
  Admission(kj::Timer& timer, const ServerConfig& config)
      : timer(timer), config(config), total(config.maxHandshakes),
        connections(config.maxConnections), holds(*this) {}

  // One source's share of the slots, while handshakes from it hold or wait for one.
  struct Share {
    explicit Share(size_t limit): semaphore(limit) {}
    Semaphore semaphore;
    size_t users = 0;
  };

  // A handshake's use of its source's share (the entry goes with its last user).
  struct ShareUser {
    ShareUser(Admission& admission, std::string key): admission(admission), key(kj::mv(key)) {
      auto& share = admission.shares[this->key];
      if (share.get() == nullptr) share = kj::heap<Share>(admission.config.maxHandshakesPerSource);
      ++share->users;
    }
    ~ShareUser() noexcept(false) {
      auto it = admission.shares.find(key);
      if (it != admission.shares.end() && --it->second->users == 0) admission.shares.erase(it);
    }
    KJ_DISALLOW_COPY(ShareUser);
    Semaphore& semaphore() { return admission.shares[key]->semaphore; }
    Admission& admission;
    std::string key;
  };

  // A handshake's slot: its source's share, then one of the total (released
  // in the reverse order).
  struct Slot {
    kj::Maybe<kj::Own<ShareUser>> user;
    kj::Maybe<kj::Own<Semaphore::Permit>> share;
    kj::Maybe<kj::Own<Semaphore::Permit>> total;
    bool waited = false;
  };

  // A connection counted between accept and the end of its handshake.
  struct Unauthenticated {
    Unauthenticated(Admission& admission, std::string key)
        : admission(admission), key(kj::mv(key)) { ++admission.unauthenticated[this->key]; }
    ~Unauthenticated() noexcept(false) {
      auto it = admission.unauthenticated.find(key);
      if (it != admission.unauthenticated.end() && --it->second == 0) {
        admission.unauthenticated.erase(it);
      }
    }
    KJ_DISALLOW_COPY(Unauthenticated);
    Admission& admission;
    std::string key;
  };

  kj::Maybe<kj::Own<Unauthenticated>> countUnauthenticated(const std::string& key) {
    auto it = unauthenticated.find(key);
    if (it != unauthenticated.end() &&
        it->second >= kj::max(config.maxUnauthenticatedPerSource, size_t(1))) {
      return nullptr;
    }
    return kj::heap<Unauthenticated>(*this, key);
  }

  kj::Promise<kj::Own<Slot>> acquire(const kj::Maybe<std::string>& source) {
    auto slot = kj::heap<Slot>();
    Slot* raw = slot.get();
    kj::Promise<void> shared = kj::READY_NOW;
    KJ_IF_MAYBE(key, source) {
      auto user = kj::heap<ShareUser>(*this, *key);
      auto& semaphore = user->semaphore();
      raw->user = kj::mv(user);
      KJ_IF_MAYBE(permit, semaphore.tryAcquire()) {
        raw->share = kj::mv(*permit);
      } else {
        raw->waited = true;
        shared = semaphore.acquire().then([raw](kj::Own<Semaphore::Permit> p) {
          raw->share = kj::mv(p);
        });
      }
    }
    // `slot` outlives `raw`'s users: a promise drops its dependency before its function.
    return shared
        .then([this, raw]() -> kj::Promise<void> {
          KJ_IF_MAYBE(permit, total.tryAcquire()) {
            raw->total = kj::mv(*permit);
            return kj::READY_NOW;
          }
          raw->waited = true;
          return total.acquire().then([raw](kj::Own<Semaphore::Permit> p) {
            raw->total = kj::mv(p);
          });
        })
        .then([this, slot = kj::mv(slot)]() mutable {
          ++stats.admitted;
          if (slot->waited) ++stats.waited;
          stats.peakInProgress = kj::max(stats.peakInProgress, total.inUse());
          return kj::mv(slot);
        });
  }

  // A handshake failed after admission: its slot stays taken for the hold.
  void holdAfterFailure(kj::Own<Slot> slot) {
    if (config.handshakeFailureHold <= 0 * kj::SECONDS) return;
    ++stats.heldAfterFailure;
    holds.add(timer.afterDelay(config.handshakeFailureHold).attach(kj::mv(slot)));
  }

  void taskFailed(kj::Exception&& exception) override {
    KJ_LOG(ERROR, "capnp-noise: a failure hold failed", exception);
  }

  kj::Timer& timer;
  const ServerConfig& config;
  std::map<std::string, kj::Own<Share>> shares;
  std::map<std::string, size_t> unauthenticated;
  Semaphore total;
  Semaphore connections;
  size_t places = 0;
  AdmissionStats stats;
  kj::TaskSet holds;  // last: its slots go back to the semaphores above
};

namespace {

// One connection from accept to the end of its handshake: its deadlines, its
// slot and its place among its source's unauthenticated connections.
class Pending final: public Gate {
public:
  Pending(Server::Admission& admission, kj::Timer& timer, const ServerConfig& config,
          kj::Maybe<std::string> source,
          kj::Maybe<kj::Own<Server::Admission::Unauthenticated>> counted)
      : admission(admission), timer(timer), config(config), source(kj::mv(source)),
        counted(kj::mv(counted)), deadline(timer.now() + config.handshakeTimeout) {}
  KJ_DISALLOW_COPY(Pending);

  ~Pending() noexcept(false) {
    KJ_IF_MAYBE(slot, held) {
      // Failed after public-key work was spent on it: hold the slot. (Before
      // admission, or once completed, it goes back at once.)
      if (isAdmitted) admission.holdAfterFailure(kj::mv(*slot));
    }
  }

  void receivedMessage1() override { gotMessage1 = true; }

  kj::Promise<void> slot() override {
    return admission.acquire(source).then([this](kj::Own<Server::Admission::Slot> slot) {
      held = kj::mv(slot);
    });
  }

  void admitted() override {
    isAdmitted = true;
    // The rest of the handshake gets a whole timeout of its own.
    deadline = timer.now() + config.handshakeTimeout;
  }

  // The handshake completed: its slot and its place go back at once.
  void completed() {
    held = nullptr;
    counted = nullptr;
  }

  // Fails when a deadline passes: message 1 not in by firstMessageTimeout,
  // or the handshake timeout from accept to admission or from admission on.
  kj::Promise<kj::Own<NoiseStream>> deadlines() {
    auto first = timer.afterDelay(config.firstMessageTimeout)
        .then([this]() -> kj::Promise<kj::Own<NoiseStream>> {
          if (gotMessage1) return kj::NEVER_DONE;
          return handshakeTimeout("the preamble and message 1 did not arrive in time");
        });
    return first.exclusiveJoin(untilDeadline());
  }

private:
  Server::Admission& admission;
  kj::Timer& timer;
  const ServerConfig& config;
  kj::Maybe<std::string> source;
  kj::Maybe<kj::Own<Server::Admission::Unauthenticated>> counted;
  kj::Maybe<kj::Own<Server::Admission::Slot>> held;
  kj::TimePoint deadline;
  bool gotMessage1 = false;
  bool isAdmitted = false;

  kj::Promise<kj::Own<NoiseStream>> untilDeadline() {
    return timer.atTime(deadline).then([this]() -> kj::Promise<kj::Own<NoiseStream>> {
      if (timer.now() < deadline) return untilDeadline();  // moved on by admission
      return handshakeTimeout(isAdmitted
          ? "the handshake did not complete in time"
          : "message 1 waited too long for a handshake slot");
    });
  }
};

}  // namespace

Server::Server(kj::Timer& timer, Identity identity, Policy policy, BootstrapFactory bootstrap,
               ServerConfig config)
    : timer(timer), identity(kj::mv(identity)), policy(kj::mv(policy)),
      bootstrap(kj::mv(bootstrap)), config(config),
      admission(kj::heap<Admission>(timer, this->config)), tasks(*this) {}

Server::Server(kj::Timer& timer, Identity identity, Policy policy, BootstrapFactory bootstrap,
               kj::Duration handshakeTimeout)
    : Server(timer, kj::mv(identity), kj::mv(policy), kj::mv(bootstrap), [&]() {
        ServerConfig c;
        c.handshakeTimeout = handshakeTimeout;
        return c;
      }()) {}

Server::~Server() noexcept(false) {}

AdmissionStats Server::stats() const {
  auto s = admission->stats;
  s.inProgress = admission->total.inUse();
  s.connections = admission->places;
  return s;
}

kj::Promise<void> Server::listen(kj::ConnectionReceiver& listener) {
  // A place among maxConnections first: while none is free, connections
  // wait in the listen backlog.
  return admission->connections.acquire().then(
      [this, &listener](kj::Own<Semaphore::Permit> permit) {
        return listener.accept().then(
            [this, &listener, permit = kj::mv(permit)](kj::Own<kj::AsyncIoStream>&& c) mutable {
              serve(kj::mv(c), kj::heap<Place>(kj::mv(permit)));
              return listen(listener);
            });
      });
}

void Server::accept(kj::Own<kj::AsyncIoStream> connection) {
  serve(kj::mv(connection), nullptr);
}

void Server::serve(kj::Own<kj::AsyncIoStream> connection, kj::Maybe<kj::Own<Place>> place) {
  auto source = sourceOf(*connection);
  kj::Maybe<kj::Own<Admission::Unauthenticated>> counted;
  KJ_IF_MAYBE(key, source) {
    KJ_IF_MAYBE(c, admission->countUnauthenticated(*key)) {
      counted = kj::mv(*c);
    } else {
      ++admission->stats.refusedAtAccept;
      return;  // dropping the connection closes it
    }
  }
  if (place != nullptr) ++admission->places;
  auto pending = kj::heap<Pending>(*admission, timer, config, kj::mv(source), kj::mv(counted));
  auto& p = *pending;
  auto handshake = handshakeResponder(kj::mv(connection), identity, policy, p)
      .exclusiveJoin(p.deadlines());
  auto placeCounted = place != nullptr;
  tasks.add(handshake
      .then(
          [this, &p](kj::Own<NoiseStream> stream) -> kj::Promise<void> {
            p.completed();
            // Each connection gets its own TwoPartyServer, so that its
            // bootstrap capability can depend on who is calling.
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
          })
      .attach(kj::mv(pending), kj::mv(place), kj::defer([this, placeCounted]() {
        if (placeCounted) --admission->places;
      })));
}

void Server::taskFailed(kj::Exception&& exception) {
  KJ_LOG(ERROR, "capnp-noise: connection failed", exception);
}

}  // namespace capnp_noise

// The C++ side of the interoperation tests (crates/capnp-noise-c/tests/cpp.rs)
// and of the adapter's numbers: a client and a server of the demo `Office`
// schema over the capnp-noise kj adapter (cpp/capnp-noise.h), with
// capnp::TwoPartyClient and capnp::TwoPartyServer unchanged. Prints one line
// per event for the Rust test to assert on; exits 0 when the scenario
// behaved as expected.
//
//   interop server KEYFILE any|plain|ALLOWFILE [LIMITS]
//                                                serve Office on 127.0.0.1 (port printed);
//                                                plain: no capnp-noise (behind a tunnel).
//                                                LIMITS (capnp_noise::ServerConfig):
//                                                slots=N,per-source=N,unauth=N,connections=N,
//                                                first-ms=N,timeout-ms=N,hold-ms=N; with LIMITS
//                                                the admission's counts are printed (STATS)
//   interop sink-server KEYFILE                  accept capnp-noise connections one at a time
//                                                and read each to its end: SINK_EOF n (the
//                                                peer's CLOSE) or SINK_ERROR n TYPE DESCRIPTION
//   interop truncate-server KEYFILE              send "hello", then cut the TCP stream
//   interop trickle                              in-process: both ends over a pipe that
//                                                delivers at most 3 bytes per read
//   interop client ADDR VATID|plain KEYFILE SCENARIO
//     SCENARIO: calls      whoami (must be this vat), a 16 MiB echo, 100 sequential connections
//               calls-anon the same without the whoami check (a plain server behind a tunnel)
//               wrongpin   the server is not VATID: expect the refusal
//               truncated  expect "hello", then a truncation error
//               bench      sequential calls and 64 KiB echoes, timed
//               timeout    the server never answers: expect the handshake timeout (300 ms)
//               drain      read to the end: DRAIN_EOF n (the peer's CLOSE) or
//                          DRAIN_ERROR n TYPE DESCRIPTION

#include "capnp-noise.h"
#include "demo.capnp.h"

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/main.h>
#include <kj/vector.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using capnp_noise::Identity;
using capnp_noise::NoiseStream;
using capnp_noise::Policy;

void say(kj::StringPtr line) {
  std::printf("%s\n", line.cStr());
  std::fflush(stdout);
}

class OfficeImpl final: public Office::Server {
public:
  explicit OfficeImpl(kj::String caller): caller(kj::mv(caller)) {}

protected:
  kj::Promise<void> whoami(WhoamiContext context) override {
    context.getResults().setVatId(caller);
    return kj::READY_NOW;
  }
  kj::Promise<void> echo(EchoContext context) override {
    context.getResults().setData(context.getParams().getData());
    return kj::READY_NOW;
  }

private:
  kj::String caller;
};

// "slots=4,hold-ms=300" -> a ServerConfig.
capnp_noise::ServerConfig parseLimits(kj::StringPtr text) {
  capnp_noise::ServerConfig config;
  std::string all(text.cStr());
  size_t at = 0;
  while (at < all.size()) {
    size_t comma = all.find(',', at);
    if (comma == std::string::npos) comma = all.size();
    std::string item = all.substr(at, comma - at);
    at = comma + 1;
    size_t eq = item.find('=');
    KJ_REQUIRE(eq != std::string::npos, "a limit is name=value", item.c_str());
    std::string name = item.substr(0, eq);
    auto value = std::stoull(item.substr(eq + 1));
    if (name == "slots") config.maxHandshakes = value;
    else if (name == "per-source") config.maxHandshakesPerSource = value;
    else if (name == "unauth") config.maxUnauthenticatedPerSource = value;
    else if (name == "connections") config.maxConnections = value;
    else if (name == "first-ms") config.firstMessageTimeout = value * kj::MILLISECONDS;
    else if (name == "timeout-ms") config.handshakeTimeout = value * kj::MILLISECONDS;
    else if (name == "hold-ms") config.handshakeFailureHold = value * kj::MILLISECONDS;
    else KJ_FAIL_REQUIRE("unknown limit", name.c_str());
  }
  return config;
}

kj::String statsLine(const capnp_noise::Server& server) {
  auto s = server.stats();
  return kj::str("STATS in_progress=", s.inProgress, " peak=", s.peakInProgress,
                 " admitted=", s.admitted, " waited=", s.waited, " held=", s.heldAfterFailure,
                 " refused_at_accept=", s.refusedAtAccept, " connections=", s.connections);
}

kj::Promise<void> printStatsEvery(kj::Timer& timer, const capnp_noise::Server& server) {
  return timer.afterDelay(50 * kj::MILLISECONDS).then([&timer, &server]() {
    say(statsLine(server));
    return printStatsEvery(timer, server);
  });
}

int serve(kj::StringPtr keyFile, kj::StringPtr allow, kj::Maybe<kj::StringPtr> limits) {
  auto io = kj::setupAsyncIo();
  auto me = Identity::load(keyFile);
  auto address = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
  auto listener = address->listen();
  if (allow == "plain") {
    capnp::TwoPartyServer server(kj::heap<OfficeImpl>(kj::heapString("plain")));
    say(kj::str("LISTENING ", listener->getPort(), " plain"));
    server.listen(*listener).wait(io.waitScope);
    return 0;
  }
  auto policy = allow == "any" ? Policy::any() : Policy::allowListFile(allow);
  capnp_noise::ServerConfig config;
  KJ_IF_MAYBE(l, limits) {
    config = parseLimits(*l);
  }
  capnp_noise::Server server(io.provider->getTimer(), me, policy,
      [](kj::StringPtr peer) -> capnp::Capability::Client {
        say(kj::str("CONNECTED ", peer));
        return kj::heap<OfficeImpl>(kj::heapString(peer));
      }, config);
  server.onHandshakeFailure([](kj::Exception&& e) {
    say(kj::str("HANDSHAKE_FAILED ", e.getDescription()));
  });
  say(kj::str("LISTENING ", listener->getPort(), " ", me.vatId()));
  auto stats = limits == nullptr ? kj::Promise<void>(kj::NEVER_DONE)
                                 : printStatsEvery(io.provider->getTimer(), server);
  server.listen(*listener).exclusiveJoin(kj::mv(stats)).wait(io.waitScope);
  return 0;
}

// Reads `stream` to its end, counting the bytes into `*count`.
kj::Promise<void> countAll(kj::AsyncIoStream& stream, size_t& count) {
  auto buf = kj::heapArray<kj::byte>(65536);
  auto& ref = buf;
  return stream.tryRead(ref.begin(), 1, ref.size())
      .then([&stream, &count, buf = kj::mv(buf)](size_t n) -> kj::Promise<void> {
        if (n == 0) return kj::READY_NOW;
        count += n;
        return countAll(stream, count);
      });
}

// "EOF n" after the peer's CLOSE, "ERROR n TYPE DESCRIPTION" for anything else.
kj::String readToEnd(kj::AsyncIoStream& stream, kj::WaitScope& ws) {
  size_t count = 0;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { countAll(stream, count).wait(ws); })) {
    return kj::str("ERROR ", count, " ", e->getType(), " ", e->getDescription());
  }
  return kj::str("EOF ", count);
}

int sinkServer(kj::StringPtr keyFile) {
  auto io = kj::setupAsyncIo();
  auto me = Identity::load(keyFile);
  auto address = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
  auto listener = address->listen();
  say(kj::str("LISTENING ", listener->getPort(), " ", me.vatId()));
  for (;;) {
    auto tcp = listener->accept().wait(io.waitScope);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      auto stream = NoiseStream::accept(kj::mv(tcp), me, Policy::any()).wait(io.waitScope);
      say(kj::str("SINK_", readToEnd(*stream, io.waitScope)));
    })) {
      say(kj::str("SINK_HANDSHAKE_FAILED ", e->getDescription()));
    }
  }
}

int truncateServer(kj::StringPtr keyFile) {
  auto io = kj::setupAsyncIo();
  auto me = Identity::load(keyFile);
  auto address = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
  auto listener = address->listen();
  say(kj::str("LISTENING ", listener->getPort(), " ", me.vatId()));
  auto tcp = listener->accept().wait(io.waitScope);
  auto stream = NoiseStream::accept(kj::mv(tcp), me, Policy::any()).wait(io.waitScope);
  stream->write("hello", 5).wait(io.waitScope);
  // Destroying the stream closes the socket without the authenticated CLOSE.
  stream = nullptr;
  say("CUT");
  return 0;
}

// An inner stream that hands out at most 3 bytes per read: the adapter must
// reassemble preambles, handshake messages and frames from any pieces.
class Trickle final: public kj::AsyncIoStream {
public:
  explicit Trickle(kj::Own<kj::AsyncIoStream> inner): inner(kj::mv(inner)) {}
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    KJ_REQUIRE(minBytes <= 3, "Trickle cannot honour a larger minimum", minBytes);
    return inner->tryRead(buffer, minBytes, kj::min(maxBytes, size_t(3)));
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { inner->shutdownWrite(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
};

// Reads until the end of stream (or an exception).
kj::Promise<void> readAll(kj::AsyncIoStream& stream, kj::Vector<kj::byte>& into) {
  auto buf = kj::heapArray<kj::byte>(70000);
  auto& ref = buf;
  return stream.tryRead(ref.begin(), 1, ref.size())
      .then([&stream, &into, buf = kj::mv(buf)](size_t n) mutable -> kj::Promise<void> {
        if (n == 0) return kj::READY_NOW;
        into.addAll(buf.slice(0, n));
        return readAll(stream, into);
      });
}

int trickle() {
  auto io = kj::setupAsyncIo();
  auto& ws = io.waitScope;
  auto alice = Identity::generate();
  auto bob = Identity::generate();
  auto pipe = io.provider->newTwoWayPipe();
  auto connecting = NoiseStream::connect(kj::heap<Trickle>(kj::mv(pipe.ends[0])), alice,
                                         Policy::pinned(bob.vatId()));
  auto accepting = NoiseStream::accept(kj::heap<Trickle>(kj::mv(pipe.ends[1])), bob,
                                       Policy::pinned(alice.vatId()));
  auto b = accepting.wait(ws);
  auto a = connecting.wait(ws);
  KJ_REQUIRE(a->peerVatId() == bob.vatId() && b->peerVatId() == alice.vatId());
  KJ_REQUIRE(a->handshakeHash() == b->handshakeHash());

  // 1 MiB from Alice to Bob in uneven pieces, then Alice's CLOSE.
  auto data = kj::heapArray<kj::byte>(1 << 20);
  for (size_t i = 0; i < data.size(); i++) data[i] = kj::byte(i * 13 % 256);
  kj::Vector<kj::byte> got;
  auto reading = readAll(*b, got);
  auto writing = a->write(data.begin(), 100000)
      .then([&]() { return a->write(data.begin() + 100000, data.size() - 100000); })
      .then([&]() { return a->end(); });
  writing.wait(ws);
  reading.wait(ws);
  KJ_REQUIRE(got.size() == data.size() && memcmp(got.begin(), data.begin(), data.size()) == 0,
             "the data arrived changed", got.size());
  say("TRICKLE ok");
  return 0;
}

// Ends a connection cleanly, as kj's own users do: shutdownWrite() (over
// capnp-noise, the authenticated CLOSE), then read to the end of stream
// (which NoiseStream reports only after the peer's CLOSE).
void endCleanly(kj::AsyncIoStream& stream, kj::WaitScope& ws) {
  stream.shutdownWrite();
  kj::byte buf[4096];
  while (stream.tryRead(buf, 1, sizeof(buf)).wait(ws) > 0) {}
}

kj::String whoami(Office::Client& office, kj::WaitScope& ws) {
  auto reply = office.whoamiRequest().send().wait(ws);
  return kj::heapString(reply.getVatId());
}

int client(kj::StringPtr address, kj::StringPtr serverVat, kj::StringPtr keyFile,
           kj::StringPtr scenario) {
  auto io = kj::setupAsyncIo();
  auto& ws = io.waitScope;
  auto me = Identity::load(keyFile);
  auto mine = me.vatId();
  auto& network = io.provider->getNetwork();
  auto dial = [&]() -> kj::Own<kj::AsyncIoStream> {
    if (serverVat == "plain") return network.parseAddress(address).wait(ws)->connect().wait(ws);
    return capnp_noise::connect(network, io.provider->getTimer(), address, me, serverVat).wait(ws);
  };

  if (scenario == "wrongpin") {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { dial(); })) {
      say(kj::str("REFUSED ", e->getDescription()));
      return strstr(e->getDescription().cStr(), "CNOISE_STATUS_PEER_REFUSED") ? 0 : 1;
    }
    say("CONNECTED to a server that is not the pinned one");
    return 1;
  }

  if (scenario == "timeout") {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      capnp_noise::connect(network, io.provider->getTimer(), address, me, serverVat,
                           300 * kj::MILLISECONDS).wait(ws);
    })) {
      say(kj::str("TIMEOUT ", e->getDescription()));
      return strstr(e->getDescription().cStr(), "CNOISE_STATUS_HANDSHAKE_TIMEOUT") ? 0 : 1;
    }
    say("CONNECTED to a server that never answered");
    return 1;
  }

  if (scenario == "truncated") {
    auto stream = dial();
    kj::byte buf[64];
    size_t got = 0;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      for (;;) {
        size_t n = stream->tryRead(buf + got, 1, sizeof(buf) - got).wait(ws);
        if (n == 0) break;
        got += n;
      }
    })) {
      say(kj::str("READ ", kj::heapString(reinterpret_cast<char*>(buf), got)));
      say(kj::str("TRUNCATED ", e->getDescription()));
      return strstr(e->getDescription().cStr(), "CNOISE_STATUS_UNEXPECTED_EOF") ? 0 : 1;
    }
    say("CLEAN_EOF: a cut stream was reported as a clean end");
    return 1;
  }

  if (scenario == "drain") {
    auto stream = dial();
    say(kj::str("DRAIN_", readToEnd(*stream, ws)));
    return 0;
  }

  if (scenario == "bench") {
    auto stream = dial();
    capnp::TwoPartyClient rpc(*stream);
    auto office = rpc.bootstrap().castAs<Office>();
    for (int i = 0; i < 200; i++) whoami(office, ws);  // warm up
    // BENCH_CALLS / BENCH_ECHOES change the counts (e.g. for strace -c).
    auto count = [](const char* name, int otherwise) {
      const char* v = std::getenv(name);
      return v == nullptr ? otherwise : std::atoi(v);
    };
    const int calls = count("BENCH_CALLS", 5000), echoes = count("BENCH_ECHOES", 1000);
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; i++) whoami(office, ws);
    auto t1 = std::chrono::steady_clock::now();
    auto payload = kj::heapArray<kj::byte>(64 << 10);
    for (size_t i = 0; i < payload.size(); i++) payload[i] = kj::byte(i);
    for (int i = 0; i < echoes; i++) {
      auto request = office.echoRequest();
      request.setData(payload);
      KJ_REQUIRE(request.send().wait(ws).getData().size() == payload.size());
    }
    auto t2 = std::chrono::steady_clock::now();
    double rttUs = std::chrono::duration<double, std::micro>(t1 - t0).count() / calls;
    double echoS = kj::max(std::chrono::duration<double>(t2 - t1).count(), 1e-9);
    double mibS = double(echoes) * 64 / 1024 / echoS;  // payload MiB/s, each way
    char line[160];
    std::snprintf(line, sizeof(line), "BENCH call_rtt_us=%.1f echo64k_per_s=%.0f echo64k_mib_s=%.1f",
                  rttUs, echoes / echoS, mibS);
    say(line);
    return 0;
  }

  KJ_REQUIRE(scenario == "calls" || scenario == "calls-anon", scenario);
  bool checkCaller = scenario == "calls";
  {
    auto stream = dial();
    {
      capnp::TwoPartyClient rpc(*stream);
      auto office = rpc.bootstrap().castAs<Office>();
      auto seen = whoami(office, ws);
      say(kj::str("WHOAMI ", seen));
      KJ_REQUIRE(!checkCaller || seen == mine, "the server saw another VatId", seen, mine);

      auto request = office.echoRequest();
      auto data = request.initData(16 << 20);
      for (size_t i = 0; i < data.size(); i++) data[i] = kj::byte(i * 7 % 251);
      auto start = std::chrono::steady_clock::now();
      auto reply = request.send().wait(ws);
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - start).count();
      // (The request's own buffer is gone once it is sent: compare with the pattern.)
      auto back = reply.getData();
      KJ_REQUIRE(back.size() == size_t(16 << 20), "the 16 MiB echo came back short", back.size());
      for (size_t i = 0; i < back.size(); i++) {
        KJ_REQUIRE(back[i] == kj::byte(i * 7 % 251), "the 16 MiB echo came back different", i);
      }
      say(kj::str("ECHO16M ok ", ms, " ms"));
    }
    endCleanly(*stream, ws);
  }
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; i++) {
    auto stream = dial();
    {
      capnp::TwoPartyClient rpc(*stream);
      auto office = rpc.bootstrap().castAs<Office>();
      auto seen = whoami(office, ws);
      KJ_REQUIRE(!checkCaller || seen == mine, "the server saw another VatId", seen, mine, i);
    }
    endCleanly(*stream, ws);
  }
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - start).count();
  say(kj::str("SEQ100 ok ", ms, " ms"));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int status = 2;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    kj::StringPtr mode = argc > 1 ? argv[1] : "";
    if (mode == "server" && (argc == 4 || argc == 5)) {
      status = serve(argv[2], argv[3],
                     argc == 5 ? kj::Maybe<kj::StringPtr>(argv[4]) : kj::Maybe<kj::StringPtr>(nullptr));
    } else if (mode == "sink-server" && argc == 3) {
      status = sinkServer(argv[2]);
    } else if (mode == "trickle" && argc == 2) {
      status = trickle();
    } else if (mode == "truncate-server" && argc == 3) {
      status = truncateServer(argv[2]);
    } else if (mode == "client" && argc == 6) {
      status = client(argv[2], argv[3], argv[4], argv[5]);
    } else {
      std::fprintf(stderr, "usage: see the top of interop.c++\n");
    }
  })) {
    say(kj::str("ERROR ", e->getDescription()));
    return 1;
  }
  return status;
}

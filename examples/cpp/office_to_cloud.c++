// The office-to-cloud demo in C++: examples/cpp/build.sh builds it.
//
// An office machine calls a cloud service with Cap'n Proto RPC over
// capnp-noise, in-process (no tunnel daemon), on loopback, with no setup:
// both identities are made in memory, the office pins the cloud's VatId (no
// certificates, no CA), the cloud sees which vat calls and builds that
// caller's bootstrap capability from it, a capability travels each way,
// and an impostor with another key is refused before the office reveals
// who it is.
//
// The schema is crates/capnp-noise-test/schema/demo.capnp, the one the Rust
// example uses; the two interoperate (see crates/capnp-noise-c/tests/cpp.rs):
//
//   office_to_cloud                   the whole demo, both sides in this process
//   office_to_cloud ADDRESS VATID     only the office, calling the cloud at
//                                     ADDRESS whose VatId is VATID, e.g. the
//                                     Rust example's `office_to_cloud --serve`

#include <capnp-noise.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/debug.h>

#include <cstdio>

#include "demo.capnp.h"

namespace {

// What the cloud gives one caller: it knows who is calling.
class CloudOffice final: public Office::Server {
public:
  explicit CloudOffice(kj::String caller): caller(kj::mv(caller)) {}

protected:
  kj::Promise<void> whoami(WhoamiContext context) override {
    context.getResults().setVatId(caller);
    return kj::READY_NOW;
  }

  kj::Promise<void> echo(EchoContext context) override {
    context.getResults().setData(context.getParams().getData());
    return kj::READY_NOW;
  }

  // Calls the office's callback `count` times, then hands back a
  // capability that remembers who subscribed.
  kj::Promise<void> subscribe(SubscribeContext context) override {
    auto params = context.getParams();
    auto callback = params.getCallback();
    uint32_t count = params.getCount();
    kj::Promise<void> calls = kj::READY_NOW;
    for (uint32_t i = 1; i <= count; i++) {
      calls = calls.then([callback, i, count, this]() mutable {
        auto request = callback.notifyRequest();
        request.setMsg(kj::str("notification ", i, "/", count, " for ", caller.slice(0, 16)));
        return request.send().ignoreResult();
      });
    }
    return calls.then([context, count, this]() mutable {
      context.getResults().setSubscription(
          kj::heap<CloudSubscription>(count, kj::heapString(caller)));
    });
  }

private:
  class CloudSubscription final: public Subscription::Server {
  public:
    CloudSubscription(uint32_t count, kj::String subscriber)
        : count(count), subscriber(kj::mv(subscriber)) {}

  protected:
    kj::Promise<void> delivered(DeliveredContext context) override {
      auto results = context.getResults();
      results.setCount(count);
      results.setSubscriber(subscriber);
      return kj::READY_NOW;
    }

  private:
    uint32_t count;
    kj::String subscriber;
  };

  kj::String caller;
};

// The office's callback: a capability passed from client to server.
class Printer final: public Callback::Server {
protected:
  kj::Promise<void> notify(NotifyContext context) override {
    std::printf("  office: the cloud called back: %s\n", context.getParams().getMsg().cStr());
    return kj::READY_NOW;
  }
};

// The office's side: calls over an established stream, then the
// authenticated close.
void officeCalls(capnp_noise::NoiseStream& stream, kj::StringPtr officeVat, kj::WaitScope& ws) {
  {
    capnp::TwoPartyClient client(stream);
    auto cap = client.bootstrap().castAs<Office>();

    auto seen = cap.whoamiRequest().send().wait(ws);
    std::printf("office: the cloud says I am %s\n", seen.getVatId().cStr());
    KJ_REQUIRE(seen.getVatId() == officeVat, "the cloud saw another VatId");

    auto subscribe = cap.subscribeRequest();
    subscribe.setCallback(kj::heap<Printer>());
    subscribe.setCount(3);
    auto subscription = subscribe.send().wait(ws).getSubscription();
    auto delivered = subscription.deliveredRequest().send().wait(ws);
    std::printf("office: %u notifications delivered to %s\n", delivered.getCount(),
                kj::str(delivered.getSubscriber().slice(0, 16)).cStr());
  }
  // The authenticated close: without it the cloud would see a truncated stream.
  stream.end().wait(ws);
}

}  // namespace

int main(int argc, char** argv) {
  auto io = kj::setupAsyncIo();
  auto& ws = io.waitScope;
  auto& network = io.provider->getNetwork();
  auto& timer = io.provider->getTimer();

  if (argc == 3) {
    // Only the office, pinning the cloud's VatId given on the command line.
    auto office = capnp_noise::Identity::generate();
    auto officeVat = office.vatId();
    std::printf("office %s calling %s\n", officeVat.cStr(), argv[1]);
    auto stream = capnp_noise::connect(network, timer, argv[1], office, argv[2]).wait(ws);
    officeCalls(*stream, officeVat, ws);
    return 0;
  }
  if (argc != 1) {
    std::fprintf(stderr, "usage: office_to_cloud [ADDRESS CLOUD_VATID]\n");
    return 2;
  }
  // Identities: in a real deployment, capnp_noise::Identity::load("cloud.key")
  // reads a key file made by `capnp-noise keygen`.
  auto cloud = capnp_noise::Identity::generate();
  auto office = capnp_noise::Identity::generate();
  auto cloudVat = cloud.vatId();
  auto officeVat = office.vatId();

  // The cloud: any authenticated vat may call (an allow-list file would be
  // capnp_noise::Policy::allowListFile("clients.allow")); each caller gets a
  // CloudOffice that knows its VatId.
  capnp_noise::Server server(timer, cloud, capnp_noise::Policy::any(),
      [](kj::StringPtr caller) -> capnp::Capability::Client {
        std::printf("  cloud: %s connected\n", caller.cStr());
        return kj::heap<CloudOffice>(kj::heapString(caller));
      });
  auto listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
  auto address = kj::str("127.0.0.1:", listener->getPort());
  auto serving = server.listen(*listener).eagerlyEvaluate([](kj::Exception&& e) {
    KJ_LOG(ERROR, e);
  });
  std::printf("cloud  %s listening on %s\n", cloudVat.cStr(), address.cStr());
  std::printf("office %s\n", officeVat.cStr());

  // The office pins the cloud's VatId and uses capnp::TwoPartyClient as usual.
  auto stream = capnp_noise::connect(network, timer, address, office, cloudVat).wait(ws);
  officeCalls(*stream, officeVat, ws);

  // An impostor: another key at another address. The office refuses it
  // after handshake message 2, before sending its own identity.
  auto impostor = capnp_noise::Identity::generate();
  capnp_noise::Server fake(timer, impostor, capnp_noise::Policy::any(),
      [](kj::StringPtr) -> capnp::Capability::Client {
        KJ_FAIL_REQUIRE("the impostor must never see the office's identity");
      });
  fake.onHandshakeFailure([](kj::Exception&&) {});
  auto fakeListener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
  auto fakeServing = fake.listen(*fakeListener).eagerlyEvaluate(nullptr);
  auto fakeAddress = kj::str("127.0.0.1:", fakeListener->getPort());
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp_noise::connect(network, timer, fakeAddress, office, cloudVat).wait(ws);
  })) {
    std::printf("office: refused the impostor: %s\n", e->getDescription().cStr());
    return 0;
  }
  std::printf("office: connected to an impostor!\n");
  return 1;
}

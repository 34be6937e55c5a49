# The demo service of `examples/office_to_cloud.rs` and of the RPC tests.
#
# Not part of the wire protocol: any Cap'n Proto schema runs over
# capnp-noise. This one exists to show what the transport gives a service:
# who is calling (`whoami`), large payloads (`echo`), and capabilities
# passed both ways (`subscribe` takes a client's `Callback` and returns a
# server-side `Subscription`).

@0xa1969fc693c842b3;

interface Office {
  whoami @0 () -> (vatId :Text);
  # The caller's VatId (text form), as the server authenticated it.

  echo @1 (data :Data) -> (data :Data);
  # Returns `data` unchanged.

  subscribe @2 (callback :Callback, count :UInt32) -> (subscription :Subscription);
  # The server calls `callback.notify` `count` times before answering, then
  # returns a capability for the subscription.

  sleep @3 (millis :UInt32) -> ();
  # Answers after `millis` milliseconds (tests of calls in flight).
}

interface Callback {
  notify @0 (msg :Text) -> ();
}

interface Subscription {
  delivered @0 () -> (count :UInt32, subscriber :Text);
  # How many notifications were delivered, and to which VatId.
}

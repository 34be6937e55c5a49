#!/usr/bin/env python3
"""A Cap'n Proto RPC peer written with pycapnp, for the tunnel tests.

It speaks plain Cap'n Proto two-party RPC over TCP, the `Office` interface of
schema/demo.capnp, and knows nothing of capnp-noise: tests/tunnel.rs puts
capnp-noise tunnels between two of these (or between the client and a native
capnp-noise server) and checks that the calls work across.

  office_peer.py server --schema schema/demo.capnp
      listens on 127.0.0.1 (a free port), prints "LISTENING <port>", serves
      Office until killed: whoami -> "pycapnp", echo, subscribe (calls the
      client's callback back), sleep.
  office_peer.py client --schema schema/demo.capnp --port P [--big N]
      calls whoami, echo (empty, small, N bytes), and subscribe with a
      callback (capabilities both ways), checks every answer, prints
      "OK whoami=<text> echoed=<bytes> notified=<n> delivered=<n>" and exits 0.
  office_peer.py --check
      prints "VERSIONS pycapnp=<v>" (is pycapnp usable?).
"""

import argparse
import asyncio
import os
import sys


def fail(msg):
    print(f"FAIL {msg}", flush=True)
    sys.exit(1)


def load(schema):
    import capnp

    return capnp.load(schema)


def make_server(demo):
    class Subscription(demo.Subscription.Server):
        def __init__(self, count, subscriber):
            self.count = count
            self.subscriber = subscriber

        async def delivered(self, _context, **kwargs):
            _context.results.count = self.count
            _context.results.subscriber = self.subscriber

    class Office(demo.Office.Server):
        async def whoami(self, _context, **kwargs):
            # Behind a tunnel, the service does not learn the caller's VatId.
            _context.results.vatId = "pycapnp"

        async def echo(self, data, _context, **kwargs):
            _context.results.data = data

        async def subscribe(self, callback, count, _context, **kwargs):
            for i in range(1, count + 1):
                await callback.notify(f"notification {i}/{count} from pycapnp")
            _context.results.subscription = Subscription(count, "pycapnp")

        async def sleep(self, millis, _context, **kwargs):
            await asyncio.sleep(millis / 1000)

    return Office


async def serve(args):
    import capnp

    demo = load(args.schema)
    office = make_server(demo)

    async def on_connection(stream):
        await capnp.TwoPartyServer(stream, bootstrap=office()).on_disconnect()

    server = await capnp.AsyncIoStream.create_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    async with server:
        await server.serve_forever()


async def call(args):
    import capnp

    demo = load(args.schema)

    class Callback(demo.Callback.Server):
        def __init__(self):
            self.messages = []

        async def notify(self, msg, _context, **kwargs):
            self.messages.append(msg)

    stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1", port=args.port)
    client = capnp.TwoPartyClient(stream)
    office = client.bootstrap().cast_as(demo.Office)

    who = (await office.whoami()).vatId
    echoed = 0
    for size in (0, 1, 1000, args.big):
        data = os.urandom(size)
        got = (await office.echo(data)).data
        if got != data:
            fail(f"echo of {size} bytes came back as {len(got)} different bytes")
        echoed += size
    # Concurrent calls in flight at once over the one connection.
    many = [office.echo(bytes([i]) * 100) for i in range(20)]
    for i, reply in enumerate(await asyncio.gather(*many)):
        if reply.data != bytes([i]) * 100:
            fail(f"concurrent echo {i} came back wrong")
    callback = Callback()
    sub = (await office.subscribe(callback, args.notify)).subscription
    delivered = await sub.delivered()
    if len(callback.messages) != args.notify or delivered.count != args.notify:
        fail(f"{len(callback.messages)} notifications, server says {delivered.count}")
    print(
        f"OK whoami={who} echoed={echoed} notified={len(callback.messages)} "
        f"delivered={delivered.count}",
        flush=True,
    )


def main():
    if sys.argv[1:] == ["--check"]:
        import capnp

        print(f"VERSIONS pycapnp={capnp.__version__}", flush=True)
        return
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--schema", required=True)
    p.add_argument("--port", type=int)
    p.add_argument("--big", type=int, default=1 << 20)
    p.add_argument("--notify", type=int, default=5)
    args = p.parse_args()
    import capnp

    if args.mode == "server":
        asyncio.run(capnp.run(serve(args)))
    else:
        if args.port is None:
            fail("client needs --port")
        asyncio.run(capnp.run(call(args)))


if __name__ == "__main__":
    main()

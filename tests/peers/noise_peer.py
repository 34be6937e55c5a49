#!/usr/bin/env python3
"""An independent capnp-noise v1 peer, for interoperability tests.

Written from the protocol description alone (SPEC.md / the module docs of
src/wire), with no code of the Rust crate: Noise comes from `noiseprotocol`,
the handshake payload from `pycapnp` (loading schema/noise.capnp at run time),
Ed25519 from `cryptography`.

    preamble   = b"capnp-noise" || version u8 (1) || name_len u8 || Noise protocol name
                 (the whole preamble is the Noise prologue on both sides)
    framing    = u16 big-endian length || Noise message, for every message
    handshake  = Noise XX: msg1 (-> e, empty payload, 32 bytes),
                 msg2 (<- e, ee, s, es; payload), msg3 (-> s, se; payload)
    payload    = Cap'n Proto message (standard stream framing, unpacked) whose root is
                 HandshakePayload { vatId :VatId { ed25519 :Data(32) }; staticKeySignature :Data(64) }
                 signature = Ed25519(b"capnp-noise/v1 static-key:" || sender's X25519 static public key)
    transport  = u16 len || AEAD(body || type); type 0x00 DATA, 0x01 CLOSE (empty body),
                 0x02 REKEY (empty body; the sender then rekeys its sending key, the
                 receiver its receiving key right after decrypting it)

One connection per run. Everything this peer learns is printed to stdout as one
line per event, `WORD key=value ...`, for the test to parse:

    LISTENING port=P
    HANDSHAKE role=R suite=S local_vat=HEX peer_vat=HEX peer_static=HEX hash=HEX
    DONE sent_bytes=N recv_bytes=N frames_sent=N frames_recv=N rekeys_sent=N rekeys_recv=N
    REFUSED peer_vat=HEX expected=HEX
    UNSUPPORTED_SUITE name=NAME             (responder with --connections: it closed
                                             that connection silently and waits for another)
    ERROR kind=K [bytes_after=N] msg=...        (exit status 1)

Scripts (after the handshake):
  * --echo: echo every DATA frame back as one DATA frame; after every
    --rekey-every echoed frames send REKEY; on CLOSE answer CLOSE and expect EOF.
  * --send SCRIPT [--coalesce]: SCRIPT is comma-separated: a number N sends one
    DATA frame of N random bytes and reads until the same bytes came back; R
    sends REKEY. Then send CLOSE, read the peer's CLOSE and expect EOF. With --coalesce the
    initiator's message 3 goes out in one write with its first transport frame.
"""

import argparse
import os
import socket
import sys

MAGIC = b"capnp-noise"
VERSION = 1
SUITES = ("Noise_XX_25519_ChaChaPoly_BLAKE2s", "Noise_XX_25519_AESGCM_SHA256")
BINDING_CONTEXT = b"capnp-noise/v1 static-key:"
DH_LEN = 32
TAG_LEN = 16
MAX_MESSAGE_LEN = 65535
MAX_PLAINTEXT = MAX_MESSAGE_LEN - TAG_LEN  # body + type byte: 65519
MAX_DATA = MAX_PLAINTEXT - 1  # 65518
MIN_TRANSPORT_FRAME = 1 + TAG_LEN
MAX_PAYLOAD = 4096
TRAVERSAL_LIMIT_WORDS = MAX_PAYLOAD // 8
NESTING_LIMIT = 8
DATA, CLOSE, REKEY = 0x00, 0x01, 0x02
IO_TIMEOUT = 20.0


class PeerError(Exception):
    """A failure this peer reports as `ERROR kind=...`."""

    def __init__(self, kind, msg, **extra):
        super().__init__(msg)
        self.kind = kind
        self.extra = extra


class PeerEOF(PeerError):
    def __init__(self, during, got):
        super().__init__("eof", f"the peer closed the connection during {during}", bytes_after=got)


def emit(word, **fields):
    parts = [word] + [f"{k}={v}" for k, v in fields.items()]
    print(" ".join(parts), flush=True)


class Wire:
    """A TCP connection with exact reads and a count of bytes received."""

    def __init__(self, sock):
        self.sock = sock
        self.received = 0
        self.queued = b""

    def recv_exact(self, n, during):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise PeerEOF(during, len(buf))
            buf += chunk
        self.received += n
        return bytes(buf)

    def recv_frame(self, lo, hi, what):
        n = int.from_bytes(self.recv_exact(2, what), "big")
        if n < lo or n > hi:
            raise PeerError("bad-frame", f"{what}: length {n} outside {lo}..{hi}")
        return self.recv_exact(n, what)

    def queue_frame(self, msg):
        """Holds a frame back, to go out in one write with the next one."""
        msg = bytes(msg)
        assert 0 < len(msg) <= MAX_MESSAGE_LEN
        self.queued += len(msg).to_bytes(2, "big") + msg

    def send_frame(self, msg):
        self.queue_frame(msg)
        data, self.queued = self.queued, b""
        self.sock.sendall(data)

    def expect_eof(self, during):
        """After the peer's CLOSE, nothing but the end of the stream may follow."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            raise PeerError("data-after-close", f"{len(chunk)} bytes arrived {during}")


# ----- handshake payload -----


def framed_len(data):
    """Length of the Cap'n Proto stream-framed message at the start of `data`."""
    if len(data) < 8:
        raise PeerError("bad-payload", "shorter than a segment table")
    nseg = int.from_bytes(data[0:4], "little") + 1
    if nseg > TRAVERSAL_LIMIT_WORDS:
        raise PeerError("bad-payload", f"{nseg} segments")
    header = (4 + 4 * nseg + 7) // 8 * 8
    if len(data) < header:
        raise PeerError("bad-payload", "truncated segment table")
    words = sum(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "little") for i in range(nseg))
    return header + 8 * words


def build_payload(schema, vat_id, signature):
    msg = schema.HandshakePayload.new_message()
    msg.init("vatId").ed25519 = vat_id
    msg.staticKeySignature = signature
    return msg.to_bytes()


def parse_payload(schema, data):
    if len(data) > MAX_PAYLOAD:
        raise PeerError("bad-payload", f"{len(data)} bytes exceed {MAX_PAYLOAD}")
    if framed_len(data) != len(data):
        raise PeerError("bad-payload", f"message length {framed_len(data)} != payload length {len(data)}")
    try:
        with schema.HandshakePayload.from_bytes(
            data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS, nesting_limit=NESTING_LIMIT
        ) as p:
            if not p._has("vatId"):
                raise PeerError("bad-payload", "vatId missing")
            vat_id = bytes(p.vatId.ed25519)
            sig = bytes(p.staticKeySignature)
    except PeerError:
        raise
    except Exception as e:  # pycapnp raises KjException and friends
        raise PeerError("bad-payload", f"not a HandshakePayload: {e}")
    if len(vat_id) != 32 or len(sig) != 64:
        raise PeerError("bad-payload", f"vatId {len(vat_id)} bytes, signature {len(sig)} bytes")
    return vat_id, sig


def verify_binding(vat_id, sig, static_public):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(vat_id).verify(sig, BINDING_CONTEXT + static_public)
    except (InvalidSignature, ValueError) as e:
        raise PeerError("bad-identity-proof", f"signature does not bind the VatId to the static key ({e!r})")


# ----- the peer -----


class Peer:
    def __init__(self, args, schema):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def x25519_public(secret):
            key = X25519PrivateKey.from_private_bytes(secret)
            return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

        self.args = args
        self.schema = schema
        self.signing = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(args.seed))
        self.vat_id = self.signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.static_secret = os.urandom(32)
        self.static_public = x25519_public(self.static_secret)
        signed_key = self.static_public
        claimed = self.vat_id
        if args.forge == "sig-other-static":
            signed_key = x25519_public(os.urandom(32))
        elif args.forge and args.forge.startswith("claim-vatid:"):
            claimed = bytes.fromhex(args.forge.split(":", 1)[1])
        signature = self.signing.sign(BINDING_CONTEXT + signed_key)
        if args.future_payload:
            import capnp

            future = capnp.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "future_noise.capnp"))
            msg = future.HandshakePayload.new_message()
            msg.init("vatId").ed25519 = claimed
            msg.staticKeySignature = signature
            msg.maxFrameSize = 65535
            msg.init("features", 2)
            msg.features[0] = "x-compression"
            msg.features[1] = "x-introductions"
            self.payload = msg.to_bytes()
        else:
            self.payload = build_payload(schema, claimed, signature)
        self.stats = dict(sent_bytes=0, recv_bytes=0, frames_sent=0, frames_recv=0, rekeys_sent=0, rekeys_recv=0)

    def noise(self, suite, prologue, initiator):
        from noise.connection import Keypair, NoiseConnection

        conn = NoiseConnection.from_name(suite.encode())
        conn.set_prologue(prologue)
        conn.set_keypair_from_private_bytes(Keypair.STATIC, self.static_secret)
        conn.set_as_initiator() if initiator else conn.set_as_responder()
        conn.start_handshake()
        # noiseprotocol deletes handshake_state when the handshake finishes; keep it to read `rs`.
        return conn, conn.noise_protocol.handshake_state

    def authenticate(self, payload, hs):
        vat_id, sig = parse_payload(self.schema, bytes(payload))
        peer_static = hs.rs.public_bytes
        verify_binding(vat_id, sig, peer_static)
        expect = self.args.expect
        if expect != "any" and vat_id != bytes.fromhex(expect):
            emit("REFUSED", peer_vat=vat_id.hex(), expected=expect)
            raise SystemExit(3)
        return vat_id, peer_static

    def handshake_initiator(self, wire):
        name = self.args.suite.encode()
        preamble = MAGIC + bytes([VERSION, len(name)]) + name
        conn, hs = self.noise(self.args.suite, preamble, True)
        msg1 = conn.write_message(b"")
        assert len(msg1) == DH_LEN
        wire.sock.sendall(preamble + len(msg1).to_bytes(2, "big") + bytes(msg1))
        msg2 = wire.recv_frame(DH_LEN + DH_LEN + 2 * TAG_LEN, DH_LEN + DH_LEN + 2 * TAG_LEN + MAX_PAYLOAD, "msg2")
        payload = self.decrypt_handshake(conn, msg2, "msg2")
        peer = self.authenticate(payload, hs)
        msg3 = conn.write_message(self.payload)
        if self.args.coalesce:
            wire.queue_frame(msg3)
        else:
            wire.send_frame(msg3)
        assert conn.handshake_finished
        return conn, peer

    def handshake_responder(self, wire):
        head = wire.recv_exact(len(MAGIC) + 2, "preamble")
        if head[: len(MAGIC)] != MAGIC or head[len(MAGIC)] != VERSION:
            raise PeerError("bad-preamble", f"unexpected preamble start {head.hex()}")
        name = wire.recv_exact(head[-1], "preamble").decode("ascii", "replace")
        accepted = SUITES if self.args.suite == "any" else (self.args.suite,)
        if name not in accepted:
            raise PeerError("unsupported-suite", f"initiator chose {name}")
        conn, hs = self.noise(name, head + name.encode(), False)
        msg1 = wire.recv_frame(DH_LEN, DH_LEN, "msg1")
        if self.decrypt_handshake(conn, msg1, "msg1"):
            raise PeerError("bad-payload", "message 1 carries a payload")
        wire.send_frame(conn.write_message(self.payload))
        received_before_msg3 = wire.received
        try:
            msg3 = wire.recv_frame(DH_LEN + 2 * TAG_LEN, DH_LEN + 2 * TAG_LEN + MAX_PAYLOAD, "msg3")
        except PeerEOF as e:
            e.extra["bytes_after"] = wire.received - received_before_msg3 + e.extra["bytes_after"]
            raise
        payload = self.decrypt_handshake(conn, msg3, "msg3")
        peer = self.authenticate(payload, hs)
        assert conn.handshake_finished
        return conn, peer, name

    @staticmethod
    def decrypt_handshake(conn, msg, what):
        try:
            return conn.read_message(msg)
        except Exception as e:  # InvalidTag, NoiseInvalidMessage, ...
            raise PeerError("decrypt", f"{what}: {e!r}")

    # ----- transport -----

    def send(self, wire, conn, ty, body=b""):
        pt = bytes(body) + bytes([ty])
        assert len(pt) <= MAX_PLAINTEXT, "noiseprotocol checks only plaintext <= 65535"
        wire.send_frame(conn.encrypt(pt))
        self.stats["frames_sent"] += 1
        if ty == DATA:
            self.stats["sent_bytes"] += len(body)
        elif ty == REKEY:
            conn.rekey_outbound_cipher()
            self.stats["rekeys_sent"] += 1

    def recv(self, wire, conn):
        """Returns (type, body) of the next frame; REKEY is applied here."""
        ct = wire.recv_frame(MIN_TRANSPORT_FRAME, MAX_MESSAGE_LEN, "a transport frame")
        try:
            pt = conn.decrypt(ct)
        except Exception as e:
            raise PeerError("decrypt", f"transport frame {self.stats['frames_recv']}: {e!r}")
        ty, body = pt[-1], pt[:-1]
        self.stats["frames_recv"] += 1
        if ty not in (DATA, CLOSE, REKEY):
            raise PeerError("protocol", f"unknown frame type {ty:#04x}")
        if ty != DATA and body:
            raise PeerError("protocol", f"control frame {ty} with a {len(body)}-byte body")
        if ty == REKEY:
            conn.rekey_inbound_cipher()
            self.stats["rekeys_recv"] += 1
        if ty == DATA:
            self.stats["recv_bytes"] += len(body)
        return ty, body

    def finish(self, wire):
        wire.expect_eof("after the peer's CLOSE")
        emit("DONE", **self.stats)

    def run_echo(self, wire, conn):
        echoed = 0
        while True:
            ty, body = self.recv(wire, conn)
            if ty == DATA:
                self.send(wire, conn, DATA, body)
                echoed += 1
                if self.args.rekey_every and echoed % self.args.rekey_every == 0:
                    self.send(wire, conn, REKEY)
            elif ty == CLOSE:
                self.send(wire, conn, CLOSE)
                wire.sock.shutdown(socket.SHUT_WR)
                return self.finish(wire)

    def run_send(self, wire, conn):
        for i, token in enumerate(t for t in self.args.send.split(",") if t):
            if token == "R":
                self.send(wire, conn, REKEY)
                continue
            size = int(token)
            if size > MAX_DATA:
                raise SystemExit(f"message size {size} exceeds {MAX_DATA}")
            msg = os.urandom(size)
            self.send(wire, conn, DATA, msg)
            got = bytearray()
            while len(got) < size:
                ty, body = self.recv(wire, conn)
                if ty == CLOSE:
                    raise PeerError("protocol", f"peer closed after echoing {len(got)} of {size} bytes")
                got += body
            if bytes(got) != msg:
                raise PeerError("echo-mismatch", f"message {i} of {size} bytes came back different")
        self.send(wire, conn, CLOSE)
        wire.sock.shutdown(socket.SHUT_WR)
        while True:
            ty, body = self.recv(wire, conn)
            if ty == CLOSE:
                return self.finish(wire)
            if ty == DATA and body:
                raise PeerError("protocol", f"{len(body)} unexpected data bytes after our CLOSE")

    def run(self, wire):
        if self.args.role == "initiator":
            conn, (peer_vat, peer_static) = self.handshake_initiator(wire)
            suite = self.args.suite
        else:
            conn, (peer_vat, peer_static), suite = self.handshake_responder(wire)
        emit(
            "HANDSHAKE",
            role=self.args.role,
            suite=suite,
            local_vat=self.vat_id.hex(),
            peer_vat=peer_vat.hex(),
            peer_static=peer_static.hex(),
            hash=conn.get_handshake_hash().hex(),
        )
        if self.args.send is not None:
            self.run_send(wire, conn)
        else:
            self.run_echo(wire, conn)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="import the dependencies, print their versions, exit")
    ap.add_argument("--role", choices=("initiator", "responder"))
    ap.add_argument("--listen", type=int, help="responder: port to bind on 127.0.0.1 (0 = any)")
    ap.add_argument("--connect", help="initiator: 127.0.0.1:PORT")
    ap.add_argument("--suite", default=SUITES[0], help="Noise protocol name; responder: or 'any'")
    ap.add_argument("--seed", help="this peer's Ed25519 seed, 64 hex digits")
    ap.add_argument("--expect", default="any", help="the peer's VatId (raw Ed25519 key, hex) or 'any'")
    ap.add_argument("--schema", default=os.path.join(os.path.dirname(__file__), "..", "..", "schema", "noise.capnp"))
    ap.add_argument("--send", help="comma-separated DATA sizes and R for REKEY (otherwise: echo)")
    ap.add_argument("--rekey-every", type=int, default=0, help="echo: send REKEY after every N echoed frames")
    ap.add_argument(
        "--future-payload",
        action="store_true",
        help="send a HandshakePayload with fields a later protocol version might add (future_noise.capnp)",
    )
    ap.add_argument(
        "--coalesce", action="store_true", help="initiator: send message 3 and the first transport frame in one write"
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=1,
        help="responder: accept up to N connections; one whose preamble names a suite it does not accept "
        "is closed without a word (SPEC.md 2) and the next is accepted",
    )
    ap.add_argument(
        "--forge",
        help="misbehave: 'sig-other-static' signs another X25519 key; 'claim-vatid:HEX' claims another VatId",
    )
    args = ap.parse_args()

    import capnp
    import cryptography
    import noise  # noqa: F401  (noiseprotocol)
    from importlib.metadata import version

    if args.check:
        emit("VERSIONS", noiseprotocol=version("noiseprotocol"), pycapnp=version("pycapnp"), cryptography=cryptography.__version__)
        return 0
    if not args.role or not args.seed or (args.role == "initiator") == (args.connect is None):
        ap.error("need --role, --seed, and --connect exactly for the initiator")
    if args.coalesce and (args.role != "initiator" or args.send is None):
        ap.error("--coalesce is for an initiator with --send")
    schema = capnp.load(os.path.abspath(args.schema))
    peer = Peer(args, schema)

    if args.role == "responder":
        listener = socket.create_server(("127.0.0.1", args.listen or 0))
        listener.settimeout(IO_TIMEOUT)
        emit("LISTENING", port=listener.getsockname()[1])
        for _ in range(args.connections - 1):
            sock, _ = listener.accept()
            sock.settimeout(IO_TIMEOUT)
            try:
                peer.run(Wire(sock))
                return 0
            except PeerError as e:
                if e.kind != "unsupported-suite":
                    emit("ERROR", kind=e.kind, **e.extra, msg=str(e).replace("\n", " "))
                    return 1
                emit("UNSUPPORTED_SUITE", name=str(e).rsplit(" ", 1)[-1])
            finally:
                sock.close()
        sock, _ = listener.accept()
        listener.close()
    else:
        host, port = args.connect.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    try:
        peer.run(Wire(sock))
        return 0
    except PeerError as e:
        emit("ERROR", kind=e.kind, **e.extra, msg=str(e).replace("\n", " "))
        return 1
    except OSError as e:  # reset, timeout
        emit("ERROR", kind="io", msg=repr(e))
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())

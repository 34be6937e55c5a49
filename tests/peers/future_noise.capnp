# A HandshakePayload as a later protocol version might extend it (test only).
#
# Same layout as schema/noise.capnp for ordinals @0 and @1, plus fields that
# version 1 receivers do not know and must ignore (SPEC.md, "Handshake payload").
# The interop test sends it from the Python peer to our version 1 core.

@0xa42e5f12548b3811;

struct VatId {
  ed25519 @0 :Data;
}

struct HandshakePayload {
  vatId @0 :VatId;
  staticKeySignature @1 :Data;
  maxFrameSize @2 :UInt32;
  features @3 :List(Text);
}

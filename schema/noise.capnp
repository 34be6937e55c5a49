# capnp-noise wire schemas (version 1).
#
# These structs travel inside Noise handshake payloads and sturdy references.
# SPEC.md is normative; this file is referred to from it. Field numbers are
# part of the wire format: never renumber, only append.

@0xd6c1c8e5a4b2f301;

struct VatId {
  # A vat's long-term identity.
  ed25519 @0 :Data;
  # A 32-byte Ed25519 public key (RFC 8032 encoding). The only kind in
  # protocol version 1. Cap'n Proto allows one existing field to be moved
  # into a new union, so later key kinds can join it compatibly.
}

struct HandshakePayload {
  # Carried, encrypted, in Noise XX message 2 (responder) and 3 (initiator).
  # Message 1 carries no payload at all (zero bytes).

  vatId @0 :VatId;
  # The sender's long-term identity.

  staticKeySignature @1 :Data;
  # 64-byte Ed25519 signature, made with the vatId's key, over
  #   "capnp-noise/v1 static-key:" || <the sender's 32-byte X25519 Noise static public key>
  # (see SPEC.md, "Identity binding").

  # Ordinals @2 and up are reserved for extensions (features, limits,
  # introductions). Receivers ignore fields they do not know.
}

struct SturdyRef {
  # A persistent reference to a capability hosted by a vat: the vat that
  # hosts it, where to reach it, and the secret that names the object.

  vatId @0 :VatId;
  # Who hosts the object. A connection is only accepted if the peer proves this identity.

  addresses @1 :List(Text);
  # Hints for where to reach the vat, "host:port" (IPv6 hosts in brackets).

  objectId @2 :Data;
  # The secret object id (at least 16 bytes). Knowing it is authority.
}

interface Restorer {
  # What a vat that hosts sturdy refs offers as its bootstrap capability
  # (or as part of it): turn an object id into the live capability.

  restore @0 (objectId :Data) -> (cap :Capability);
  # Fails, with the same error for both, if the id is unknown or revoked.
}

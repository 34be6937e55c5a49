# capnp-noise network types (version 1): introductions between vats.
#
# Cap'n Proto's rpc.capnp leaves three "network-specific parameter" types for
# three-party handoff (level 3) to each vat network:
#
#   ThirdPartyToContact   "how to reach the third party and what to ask it for";
#                         the introducer (Bob) gives it to the recipient (Alice).
#   ThirdPartyToAwait     "expect some other vat to contact you to complete this";
#                         the introducer (Bob) gives it to the provider (Carol)
#                         in rpc.capnp's `Provide` message.
#   ThirdPartyCompletion  "I am the third party whom you are waiting for";
#                         the recipient (Alice) presents it to the provider
#                         (Carol) in rpc.capnp's `Accept` message.
#
# This file defines them for the capnp-noise network under exactly those names,
# so that a future level-3 capnp-rpc can use them as they are. Until then they
# travel as ordinary values in calls of the `Vat` interface below (SPEC.md section 12).
#
# The design follows rpc.capnp's `PublicKeyExample` (vats are identified by
# public keys, and every connection is authenticated as a VatId):
#
#   rpc.capnp PublicKeyExample           here
#   ----------------------------------   ------------------------------------------
#   ThirdPartyToContact.contactVat       Introduction.provider
#   ThirdPartyToContact.contactAddress   Introduction.providerAddresses
#   ThirdPartyToContact.introducer       Introduction.introducer
#   ThirdPartyToContact.nonce (UInt64)   Introduction.nonce (32 random bytes)
#   ThirdPartyToContact.forwards         ThirdPartyToContact.forwards
#   Forward {to, by, signed}             Forward {to, signature}; `by` is implied
#   ThirdPartyToAwait.expectVat          ThirdPartyToAwait.recipient
#   ThirdPartyToAwait.nonce              ThirdPartyToAwait.nonce
#   ThirdPartyCompletion {introducer,    ThirdPartyCompletion.contact (the whole
#     nonce, forwards}                     signed contact, which holds all three)
#
# Two additions: the introduction is signed by the introducer and carries an
# absolute expiry. The signature lets the recipient, the provider and anyone a
# contact is forwarded to check, without asking the introducer, exactly what
# was introduced to whom and until when; it also roots the forwarding chain.
#
# Field numbers are part of the wire format: never renumber, only append.
# SPEC.md (section 12, "Networks of vats and introductions") is normative.

@0xbbc6c0c1c98933ea;

using Noise = import "noise.capnp";
using VatId = Noise.VatId;

struct Introduction {
  # The part of a ThirdPartyToContact that the introducer signs.
  #
  # Signed bytes: "capnp-noise/v1 introduction:" || C, where C is the
  # canonical Cap'n Proto encoding (capnproto.org/encoding.html#canonicalization)
  # of this struct as the root of its own message: one segment, starting with
  # the root pointer, with no stream segment table. A verifier recomputes C
  # from the struct it received (unknown fields included, so later versions
  # may append fields without breaking older verifiers).

  provider @0 :VatId;
  # The vat that hosts the capability (Carol), to be contacted directly.
  # rpc.capnp: `contactVat`.

  providerAddresses @1 :List(Text);
  # Hints for reaching the provider, "host:port" as in SturdyRef.addresses
  # (IPv6 hosts in brackets), tried in order; at most 16. Whatever address is
  # used, the connection counts only if the peer proves `provider`.
  # rpc.capnp: `contactAddress`.

  introducer @2 :VatId;
  # The vat that made the introduction (Bob) and signs it. The provider
  # accepts the introduction only if this same vat, over its own
  # authenticated connection, asked the provider to expect it.

  recipient @3 :VatId;
  # The vat the capability is for (Alice): the only vat that may redeem the
  # introduction, or, if it is forwarded, the first signer of the forwarding
  # chain. rpc.capnp: `ThirdPartyToAwait.expectVat`.

  nonce @4 :Data;
  # 32 random bytes naming this handoff among all the introducer's handoffs.
  # Not a secret: knowing it gives nothing to a vat other than `recipient`.

  expiresAt @5 :UInt64;
  # The introduction is void at and after this time: seconds since
  # 1970-01-01T00:00:00Z (Unix time, UTC, leap seconds not counted).
}

struct Forward {
  # One link of a forwarding chain: the current holder hands the
  # introduction on to `to` (rpc.capnp PublicKeyExample's Forward).
  #
  # The holder before link i is `Introduction.recipient` for i = 0 and
  # `forwards[i-1].to` afterwards (rpc.capnp's `by`, implied rather than
  # repeated). Link i is signed by that holder, over
  #   "capnp-noise/v1 forward:" || D_i || to.ed25519
  # where D_0 = SHA-256("capnp-noise/v1 introduction:" || C || signature)
  # and D_(i+1) = SHA-256(D_i || forwards[i].to.ed25519 || forwards[i].signature).
  # The chain therefore commits to the whole signed introduction and to every
  # earlier link, in order.
  #
  # Version 1 accepts at most ONE link: Alice may forward once, and the vat
  # she forwards to must redeem. Longer chains are refused.

  to @0 :VatId;
  # The new holder.

  signature @1 :Data;
  # 64-byte Ed25519 signature by the previous holder (see above).
}

struct ThirdPartyToContact {
  # What the introducer (Bob) gives the recipient (Alice): a signed
  # introduction, plus any forwarding links added since.

  introduction @0 :Introduction;

  signature @1 :Data;
  # 64-byte Ed25519 signature by `introduction.introducer` over
  # "capnp-noise/v1 introduction:" || canonical(introduction) (see Introduction).

  forwards @2 :List(Forward);
  # Empty when Bob hands it to Alice. Each vat that forwards the contact
  # appends one link. Version 1: at most one link.
}

struct ThirdPartyToAwait {
  # What the introducer (Bob) sends the provider (Carol) over their
  # authenticated connection, together with the capability: "set this aside
  # for `recipient`, under `nonce`, until `expiresAt`". The introducer is not
  # named here: it is the authenticated peer of that connection.

  recipient @0 :VatId;
  # Who may redeem (rpc.capnp: `expectVat`).

  nonce @1 :Data;
  # 32 bytes; the same nonce as in the Introduction.

  expiresAt @2 :UInt64;
  # Unix seconds; the provider drops the entry at this time (and may refuse
  # an expiry further away than it is willing to hold entries).
}

struct ThirdPartyCompletion {
  # What the recipient (or the last vat in the forwarding chain) presents to
  # the provider over its own authenticated connection to redeem the
  # introduction. It carries the contact exactly as received, so the provider
  # can check the introducer's signature and the forwarding chain itself.

  contact @0 :ThirdPartyToContact;
}

# ---------------------------------------------------------------------------
# The network's own RPC service (level 1).
#
# capnp-rpc today is level 1: it cannot carry ThirdPartyToContact in a
# CapDescriptor. Until it can, each connection between two vats of a
# capnp-noise network (src/network.rs) has a `Vat` as its bootstrap
# capability on both sides, and the handoff messages of rpc.capnp travel as
# ordinary calls on it: `provide` is rpc.capnp's Provide, `accept` its Accept,
# `withdraw` a Finish on the Provide. SPEC.md section 12 is normative.

enum HandoffError {
  # Why `provide` or `accept` was refused (IntroductionError in the Rust API).
  none @0;             # no error: the call succeeded
  malformed @1;        # the message is not a well-formed handoff message
  badSignature @2;     # the introducer's or a forwarding link's signature does not verify
  expired @3;          # the introduction or the request has expired
  wrongRecipient @4;   # the caller is not the introduction's holder, or the request names another recipient
  wrongProvider @5;    # the introduction names another provider
  replayed @6;         # already used (or being redeemed), or the nonce was reused
  revoked @7;          # withdrawn by the introducer or revoked by the provider
  timeout @8;          # the introducer's request did not arrive in time
  unknown @9;          # the provider no longer knows the handoff (it is shutting down)
  limit @10;           # a bound of the provider was reached
  notHosted @11;       # the capability is not hosted by the provider itself
}

interface Vat {
  # The bootstrap capability of every connection between two networked vats,
  # bound on each side to the peer's authenticated VatId. It is never handed
  # to anyone else: a provider refuses to hand off a `Vat`.

  hello @0 () -> ();
  # Asked by the initiator of a connection when its VatId is the higher of the
  # two (bytewise): returns once the responder has made this connection the
  # pair's one connection; fails if the responder keeps the connection it
  # initiated itself (crossed dials, SPEC 12.3). Answered at once on a
  # connection that is already the pair's one connection.

  bootstrap @1 () -> (cap :Capability);
  # The application's bootstrap capability for this peer.

  provide @2 (await :ThirdPartyToAwait, cap :Capability) -> (error :HandoffError, reason :Text, addresses :List(Text));
  # The introducer (the caller) asks the provider (the callee) to set `cap`
  # aside for `await.recipient`. `cap` must be hosted by the provider itself.
  # On success, `addresses` are where the provider can be reached.

  accept @3 (completion :ThirdPartyCompletion) -> (cap :Capability, error :HandoffError, reason :Text);
  # The holder of an introduction (the caller) redeems it. Waits, bounded,
  # for the introducer's `provide` if it has not arrived yet.

  withdraw @4 (nonce :Data) -> ();
  # The introducer (the caller) withdraws its handoff under `nonce`.
}

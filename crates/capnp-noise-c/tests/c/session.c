/* The C ABI from C (C11, the committed header): two identities, a pinned
 * initiator and a responder, a full handshake in memory, "hello" each way,
 * the authenticated close, then a wrong pin refused. Run by tests/cpp.rs;
 * prints OK and exits 0 when everything behaved. */
#include <stdio.h>
#include <string.h>

#include "capnp_noise.h"

#define CHECK(call)                                                              \
  do {                                                                           \
    CnoiseStatus s_ = (call);                                                    \
    if (s_ != CNOISE_STATUS_OK) {                                                \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__,                     \
              cnoise_status_name((int32_t)s_), cnoise_last_error_message());     \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

/* Moves a handshake's pending output into the other handshake. */
static CnoiseStatus hs_pump(CnoiseHandshake *from, CnoiseHandshake *to) {
  const uint8_t *data;
  size_t len, taken;
  CnoiseStatus s = cnoise_handshake_pending_output(from, &data, &len);
  if (s != CNOISE_STATUS_OK || len == 0) return s;
  s = cnoise_handshake_feed(to, data, len, &taken);
  if (s != CNOISE_STATUS_OK) return s;
  return cnoise_handshake_consume_output(from, len);
}

/* Sends `msg` from one session to the other and reads it there. */
static int say(CnoiseSession *from, CnoiseSession *to, const char *msg) {
  size_t accepted, len, taken, n;
  const uint8_t *data;
  uint8_t buf[64];
  CnoiseReadOutcome outcome;
  CHECK(cnoise_session_write(from, (const uint8_t *)msg, strlen(msg), &accepted));
  CHECK(cnoise_session_flush(from));
  CHECK(cnoise_session_pending_output(from, &data, &len));
  CHECK(cnoise_session_feed(to, data, len, &taken));
  CHECK(cnoise_session_consume_output(from, taken));
  CHECK(cnoise_session_read(to, buf, sizeof(buf), &outcome, &n));
  if (accepted != strlen(msg) || outcome != CNOISE_READ_OUTCOME_DATA || n != strlen(msg) ||
      memcmp(buf, msg, n) != 0) {
    fprintf(stderr, "%s did not arrive intact\n", msg);
    return 1;
  }
  return 0;
}

int main(void) {
  CnoiseIdentity *alice, *bob, *mallory;
  CnoisePolicy *to_bob, *anyone;
  CnoiseHandshake *init, *resp;
  CnoiseSession *a, *b;
  char bob_vat[CNOISE_VAT_ID_TEXT_SIZE], seen[CNOISE_VAT_ID_TEXT_SIZE];
  int round;

  CHECK(cnoise_identity_generate(&alice));
  CHECK(cnoise_identity_generate(&bob));
  CHECK(cnoise_identity_generate(&mallory));
  CHECK(cnoise_identity_vat_id(bob, bob_vat, sizeof(bob_vat)));
  CHECK(cnoise_policy_pinned(bob_vat, &to_bob));
  CHECK(cnoise_policy_any(&anyone));

  CHECK(cnoise_handshake_initiator(alice, to_bob, &init));
  CHECK(cnoise_handshake_responder(bob, anyone, &resp));
  for (round = 0; round < 3; round++) {
    CHECK(hs_pump(init, resp));
    CHECK(hs_pump(resp, init));
  }
  if (!cnoise_handshake_is_finished(init) || !cnoise_handshake_is_finished(resp)) {
    fprintf(stderr, "the handshake did not finish\n");
    return 1;
  }
  CHECK(cnoise_handshake_into_session(init, &a));
  CHECK(cnoise_handshake_into_session(resp, &b));
  CHECK(cnoise_session_peer_vat_id(a, seen, sizeof(seen)));
  if (strcmp(seen, bob_vat) != 0) {
    fprintf(stderr, "the initiator sees %s, not %s\n", seen, bob_vat);
    return 1;
  }
  if (say(a, b, "hello bob") || say(b, a, "hello alice")) return 1;

  /* The authenticated close: a clean end at the reader. */
  {
    const uint8_t *data;
    size_t len, taken, n;
    uint8_t buf[8];
    CnoiseReadOutcome outcome;
    CHECK(cnoise_session_close(a));
    CHECK(cnoise_session_pending_output(a, &data, &len));
    CHECK(cnoise_session_feed(b, data, len, &taken));
    CHECK(cnoise_session_read(b, buf, sizeof(buf), &outcome, &n));
    if (outcome != CNOISE_READ_OUTCOME_CLOSED) {
      fprintf(stderr, "no clean close\n");
      return 1;
    }
  }

  /* A wrong pin: Mallory answers, Alice refuses before message 3. */
  {
    CnoiseHandshake *i2, *r2;
    CnoiseStatus s;
    const uint8_t *data;
    size_t len;
    CHECK(cnoise_handshake_initiator(alice, to_bob, &i2));
    CHECK(cnoise_handshake_responder(mallory, anyone, &r2));
    CHECK(hs_pump(i2, r2));
    s = hs_pump(r2, i2);
    if (s != CNOISE_STATUS_PEER_REFUSED) {
      fprintf(stderr, "a wrong pin gave %s\n", cnoise_status_name((int32_t)s));
      return 1;
    }
    CHECK(cnoise_handshake_pending_output(i2, &data, &len));
    if (len != 0) {
      fprintf(stderr, "the refusing initiator still sends %zu bytes\n", len);
      return 1;
    }
    cnoise_handshake_free(i2);
    cnoise_handshake_free(r2);
  }

  cnoise_session_free(a);
  cnoise_session_free(b);
  cnoise_policy_free(to_bob);
  cnoise_policy_free(anyone);
  cnoise_identity_free(alice);
  cnoise_identity_free(bob);
  cnoise_identity_free(mallory);
  printf("OK\n");
  return 0;
}

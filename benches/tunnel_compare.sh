#!/usr/bin/env bash
# Compares `capnp-noise tunnel` with stunnel4 (TLS 1.3), with two pairs of
# plain relays (no crypto: the copy limit of any pair of tunnel ends) and
# with a direct connection: bulk throughput, round-trip latency, connection
# setup, in interleaved rounds, with same-round ratios, the date, the load
# average and the command. See examples/tunnel_bench.rs for what is
# measured and how.
#
#   benches/tunnel_compare.sh [--bytes N] [--rounds N] [--connects N] [--runs N]
#                             [--only direct,relay,socat,capnp-noise,capnp-noise-mt,baseline,stunnel]
#                             [--baseline OTHER-capnp-noise-BINARY]
#   benches/tunnel_compare.sh --count [--bytes N] [--rounds N]   # strace: syscalls per MiB
#   benches/tunnel_compare.sh --memory N                         # RSS per busy connection
#
# capnp-noise-mt is the tunnel with --workers 0 (one multi-threaded runtime
# instead of a runtime per core).
#
# Needs: stunnel4 and openssl on PATH (Debian: apt-get install stunnel4 openssl);
# socat for the socat pair (skipped if absent); strace for --count.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin capnp-noise --example tunnel_bench
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/examples/tunnel_bench" \
  --capnp-noise "$target_dir/release/capnp-noise" "$@"

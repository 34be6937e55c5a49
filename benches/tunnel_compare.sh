#!/usr/bin/env bash
# Compares `capnp-noise tunnel` with stunnel4 (TLS 1.3) and with a direct
# connection: bulk throughput, round-trip latency, connection setup.
# See examples/tunnel_bench.rs for what is measured and how.
#
#   benches/tunnel_compare.sh [--bytes N] [--rounds N] [--connects N] [--runs N]
#
# Needs: stunnel4 and openssl on PATH (Debian: apt-get install stunnel4 openssl).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin capnp-noise --example tunnel_bench
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/examples/tunnel_bench" \
  --capnp-noise "$target_dir/release/capnp-noise" "$@"

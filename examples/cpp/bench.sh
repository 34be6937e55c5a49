#!/bin/bash
# Issue 18's numbers: the same C++ Office client (capnp::TwoPartyClient,
# sequential calls and sequential 64 KiB echoes) against the same C++ server
#   1. over plain TCP (no security: the baseline),
#   2. over the in-process capnp-noise adapter (cpp/),
#   3. over plain TCP through a capnp-noise tunnel pair (client and server
#      services of `capnp-noise tunnel`, as stunnel would be used),
# in one run, on loopback. Prints each configuration's line and the load
# average before and after: figures taken with a load average above ~1.5
# (`uptime`) are not worth reporting.
#
#   examples/cpp/bench.sh            # release builds (the real numbers)
#   PROFILE=debug examples/cpp/bench.sh   # only checks that the script works
#   NO_BUILD=1 examples/cpp/bench.sh      # measure again with what the last run built
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
profile=${PROFILE:-release}
dir=$target/cpp-bench
mkdir -p "$dir"

cli=$target/$profile/capnp-noise
if [[ -z ${NO_BUILD:-} ]]; then
  if [[ $profile == release ]]; then
    cargo build --release -p capnp-noise-c -p capnp-noise-tunnel --manifest-path "$root/Cargo.toml"
  else
    cargo build -p capnp-noise-c -p capnp-noise-tunnel --manifest-path "$root/Cargo.toml"
  fi
  schema=$root/crates/capnp-noise-test/schema
  capnp compile -oc++:"$dir" --src-prefix="$schema" "$schema/demo.capnp"
  # shellcheck disable=SC2046 # pkg-config's flags are meant to split
  g++ -std=c++17 -O2 -I"$root/crates/capnp-noise-c/include" -I"$root/cpp" -I"$dir" \
    "$root/crates/capnp-noise-c/tests/cpp/interop.c++" "$root/cpp/capnp-noise.c++" "$dir/demo.capnp.c++" \
    -o "$dir/interop" "$target/$profile/libcapnp_noise_c.a" $(pkg-config --cflags --libs capnp-rpc) \
    -lpthread -ldl -lm
fi

keys=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$keys"
}
trap cleanup EXIT
for k in server client tunnel-server tunnel-client; do "$cli" keygen -o "$keys/$k.key" >/dev/null 2>&1; done
tunnel_client_vat=$("$cli" id "$keys/tunnel-client.key")

# Starts a program in the background (remembering its PID for cleanup),
# waits for a line matching $1 in its stdout and puts that line in $line.
line=
start() {
  local out=$keys/out.$RANDOM pattern=$1
  shift
  "$@" >"$out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do
    if line=$(grep -m1 "$pattern" "$out"); then return; fi
    sleep 0.1
  done
  echo "no $pattern from $*" >&2
  exit 1
}
addr_of() { sed 's/.* addr=\([^ ]*\).*/\1/' <<<"$1"; }

start LISTENING "$dir/interop" server "$keys/server.key" plain
plain_port=$(awk '{print $2}' <<<"$line")
start LISTENING "$dir/interop" server "$keys/server.key" any
read -r _ noise_port noise_vat <<<"$line"
tserver_vat=$("$cli" id "$keys/tunnel-server.key")
start 'listening service' "$cli" tunnel server --listen 127.0.0.1:0 \
  --connect "127.0.0.1:$plain_port" --identity "$keys/tunnel-server.key" --allow-vat "$tunnel_client_vat"
tserver=$(addr_of "$line")
start 'listening service' "$cli" tunnel client --listen 127.0.0.1:0 \
  --connect "$tserver" --identity "$keys/tunnel-client.key" --peer "$tserver_vat"
tclient=$(addr_of "$line")

echo "command: ${NO_BUILD:+NO_BUILD=$NO_BUILD }${PROFILE:+PROFILE=$PROFILE }$0 $*"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  profile=$profile  before: $(uptime)"
printf 'plain TCP           '; "$dir/interop" client "127.0.0.1:$plain_port" plain "$keys/client.key" bench
printf 'in-process adapter  '; "$dir/interop" client "127.0.0.1:$noise_port" "$noise_vat" "$keys/client.key" bench
printf 'tunnel pair         '; "$dir/interop" client "$tclient" plain "$keys/client.key" bench
echo "after: $(uptime)"

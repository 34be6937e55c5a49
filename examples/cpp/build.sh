#!/bin/sh
# Builds the C++ office-to-cloud demo against capnp-noise, in one command:
#
#   examples/cpp/build.sh && target/cpp-example/office_to_cloud
#
# Needs cargo, g++, pkg-config and Debian's libcapnp-dev and capnproto
# (`apt-get install g++ pkg-config libcapnp-dev capnproto`). PROFILE=debug
# links the debug build of the C ABI instead of the release build.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
profile=${PROFILE:-release}
out=$target/cpp-example

if [ "$profile" = release ]; then
  cargo build --release -p capnp-noise-c --manifest-path "$root/Cargo.toml"
else
  cargo build -p capnp-noise-c --manifest-path "$root/Cargo.toml"
fi
mkdir -p "$out"
schema=$root/crates/capnp-noise-test/schema
capnp compile -oc++:"$out" --src-prefix="$schema" "$schema/demo.capnp"
# shellcheck disable=SC2046 # pkg-config's flags are meant to split
g++ -std=c++17 -O2 -Wall \
  -I"$root/crates/capnp-noise-c/include" -I"$root/cpp" -I"$out" \
  "$root/examples/cpp/office_to_cloud.c++" "$root/cpp/capnp-noise.c++" "$out/demo.capnp.c++" \
  -o "$out/office_to_cloud" \
  "$target/$profile/libcapnp_noise_c.a" $(pkg-config --cflags --libs capnp-rpc) -lpthread -ldl -lm
echo "built $out/office_to_cloud"

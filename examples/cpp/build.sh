#!/bin/sh
# Builds the C++ office-to-cloud demo against capnp-noise, in one command:
#
#   examples/cpp/build.sh && target/cpp-example/office_to_cloud
#
# Needs cargo, g++, pkg-config and Debian's libcapnp-dev and capnproto
# (`apt-get install g++ pkg-config libcapnp-dev capnproto`). PROFILE=debug
# (or dev) links the debug build of the C ABI instead of the release build,
# and compiles the C++ side without optimisation, with debug information.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
profile=${PROFILE:-release}
[ "$profile" = dev ] && profile=debug
case $profile in
  release) cxxflags="-O2" ;;
  debug) cxxflags="-O0 -g" ;;
  *) echo "PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac
out=$target/cpp-example

if [ "$profile" = release ]; then
  cargo build --release -p capnp-noise-c --manifest-path "$root/Cargo.toml"
else
  cargo build -p capnp-noise-c --manifest-path "$root/Cargo.toml"
fi
mkdir -p "$out"
schema=$root/crates/capnp-noise-test/schema
capnp compile -oc++:"$out" --src-prefix="$schema" "$schema/demo.capnp"
# shellcheck disable=SC2046,SC2086 # pkg-config's flags and $cxxflags are meant to split
g++ -std=c++17 $cxxflags -Wall \
  -I"$root/crates/capnp-noise-c/include" -I"$root/cpp" -I"$out" \
  "$root/examples/cpp/office_to_cloud.c++" "$root/cpp/capnp-noise.c++" "$out/demo.capnp.c++" \
  -o "$out/office_to_cloud" \
  "$target/$profile/libcapnp_noise_c.a" $(pkg-config --cflags --libs capnp-rpc) -lpthread -ldl -lm
echo "built $out/office_to_cloud"

#![no_main]
// The body and its invariants: capnp_noise::fuzzing::tunnel_config (src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise::fuzzing::tunnel_config(data));

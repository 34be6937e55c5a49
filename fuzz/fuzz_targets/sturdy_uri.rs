#![no_main]
// The body and its invariants: capnp_noise::fuzzing::sturdy_uri (src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise::fuzzing::sturdy_uri(data));

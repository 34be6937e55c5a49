#![no_main]
// The body and its invariants: capnp_noise::fuzzing::introduction (src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise::fuzzing::introduction(data));

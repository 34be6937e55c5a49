#![no_main]
// The body and its invariants: capnp_noise::fuzzing::allow_list (src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise::fuzzing::allow_list(data));

#![no_main]
// The body and its invariants: capnp_noise::fuzzing::pair_ops (src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise::fuzzing::pair_ops(data));

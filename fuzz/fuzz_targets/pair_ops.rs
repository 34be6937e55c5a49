#![no_main]
// The body and its invariants: capnp_noise_test::fuzzing::pair_ops (crates/capnp-noise-test/src/fuzzing/).
libfuzzer_sys::fuzz_target!(init: capnp_noise_test::fuzzing::init(), |data: &[u8]| capnp_noise_test::fuzzing::pair_ops(data));

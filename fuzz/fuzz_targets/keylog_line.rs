#![no_main]
// The body and its invariants: capnp_noise_test::fuzzing::keylog_line (crates/capnp-noise-test/src/fuzzing/).
libfuzzer_sys::fuzz_target!(|data: &[u8]| capnp_noise_test::fuzzing::keylog_line(data));

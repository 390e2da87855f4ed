//! Request header parsing and validation in every reply mode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdbridge::nbd::fuzzing::request_bytes(data);
});

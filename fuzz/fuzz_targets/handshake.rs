//! Arbitrary client bytes through the whole connection: greeting, option
//! loop, transmission, with the memory backend.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nbdbridge::nbd::fuzzing::client_bytes(data);
});

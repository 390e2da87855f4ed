//! The GO / INFO / META_CONTEXT payload parsers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdbridge::nbd::fuzzing::option_bytes(data);
});

//! The imageio servers' parsers of HTTP input (Range, Content-Range, PATCH
//! JSON, ticket JSON, ticket URLs, image paths), selected by the first byte.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdbridge::imageio::fuzzing::request_bytes(data);
});

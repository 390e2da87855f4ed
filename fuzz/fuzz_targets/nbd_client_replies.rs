//! Arbitrary NBD server bytes (handshake replies, then transmission
//! replies) against the real NBD client doing connect, READ, BLOCK_STATUS,
//! WRITE, FLUSH and close over a socket pair.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = nbdbridge::nbd_client::fuzzing::server_replies(data);
    assert!(!out.timed_out, "the NBD client hung");
});

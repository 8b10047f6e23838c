//! The frame reader and both message parsers on arbitrary bytes: no panic, the cap
//! holds, and every message that parses survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small cap, so that the fuzzer reaches both sides of it.
    vmkit_guest::fuzzing::frames(data, 4096);
    // And the bytes as one body, whatever their length.
    vmkit_guest::fuzzing::message(data);
});

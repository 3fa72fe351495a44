//! The Debezium envelope parser takes untrusted messages from the transport:
//! any bytes must give an event or an error, never a panic, and never an
//! allocation sized from a number in the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The transports hand the parser text; invalid UTF-8 is rejected before.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tally::event::parse_event(text);
});

//! The server session state machine under bytes, decisions, completions and time.
//! The checks live in `weir_protocols::fuzzing::mqtt_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::mqtt_session(data);
});

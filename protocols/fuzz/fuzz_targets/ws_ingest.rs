//! A WebSocket /ingest message: device id, payload decode, reply encoding.
//! The checks live in `weir_protocols::fuzzing::ws_ingest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::ws_ingest(data);
});

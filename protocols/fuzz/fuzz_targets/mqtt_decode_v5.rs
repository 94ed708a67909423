//! MQTT 5 decoding: split-independent, round trip decode → encode → decode.
//! The checks live in `weir_protocols::fuzzing::mqtt_decode_v5`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::mqtt_decode_v5(data);
});

//! MQTT 3.1/3.1.1 decoding: split-independent, round trip decode → encode → decode.
//! The checks live in `weir_protocols::fuzzing::mqtt_decode_v311`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::mqtt_decode_v311(data);
});

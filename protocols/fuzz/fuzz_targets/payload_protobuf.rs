//! Protobuf DevicePayloads into records within limits, and back.
//! The checks live in `weir_protocols::fuzzing::payload_protobuf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::payload_protobuf(data);
});

//! Raw TCP framing (length_prefixed, lines) at arbitrary read boundaries, and hellos.
//! The checks live in `weir_protocols::fuzzing::tcp_framing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_protocols::fuzzing::tcp_framing(data);
});

//! The disk buffer's recovery over arbitrary log directories: open, replay, reopen, append,
//! acknowledge, with every invariant checked by `weir::buffer::fuzzing::segment_files`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir::buffer::fuzzing::segment_files(data);
});

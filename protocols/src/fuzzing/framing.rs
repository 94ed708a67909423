//! Raw TCP framing over arbitrary bytes with arbitrary read boundaries.
//!
//! Input: `[flags, max(u16), k, k × boundary(u16), stream...]`: `flags & 1` picks `lines`
//! (else `length_prefixed`), `max` is the frame limit, and the `k % 8` boundaries are where
//! reads end. The stream is cut as it arrives all at once, at the boundaries, and one byte at a
//! time: the frames must be the same and the stream must end the same way (a frame too large
//! is reported with the bytes seen so far for `lines`, so only its limit is compared). Every
//! frame respects the limit, line frames hold no newline and are not blank, frames framed
//! again cut back to themselves, and a hello names an acceptable device id.

use bytes::BytesMut;

use super::Input;
use crate::framing::{
    check_device_id, encode_frame, parse_hello, Frame, FrameError, Framer, Framing, MAX_DEVICE_ID_BYTES,
};

pub fn tcp_framing(data: &[u8]) {
    let mut input = Input::new(data);
    let framing = if input.u8() & 1 == 0 { Framing::LengthPrefixed } else { Framing::Lines };
    let max = usize::from(input.u16());
    let count = input.u8() % 8;
    let mut boundaries: Vec<usize> = (0..count).map(|_| usize::from(input.u16())).collect();
    let stream = input.rest();
    boundaries.retain(|&b| b < stream.len());
    boundaries.sort_unstable();
    boundaries.push(stream.len());

    let whole = cut(framing, max, stream, &[stream.len()]);
    let split = cut(framing, max, stream, &boundaries);
    let every_byte: Vec<usize> = (1..=stream.len()).collect();
    let bytewise = cut(framing, max, stream, &every_byte);
    for other in [&split, &bytewise] {
        assert_eq!(whole.frames, other.frames, "frames depend on how the bytes arrive");
        match (&whole.end, &other.end) {
            (Err(FrameError::TooLarge { len: a, max: m }), Err(FrameError::TooLarge { len: b, max: n }))
                if framing == Framing::Lines =>
            {
                assert_eq!(m, n);
                assert!(*b > max && b <= a, "line too large: {b} bytes seen, {a} in all");
            }
            (a, b) => assert_eq!(a, b, "the stream ends differently depending on how it arrives"),
        }
    }

    let mut framed_again = Vec::new();
    for frame in &whole.frames {
        check_frame(framing, max, frame);
        match frame {
            Frame::Heartbeat => encode_frame(framing, &[], &mut framed_again),
            // `encode_frame` takes a line without newline; a trailing `\r` would be read as
            // part of a `\r\n`, so such a line cannot be framed again as it is.
            Frame::Message(body) if framing == Framing::Lines && body.ends_with(b"\r") => break,
            Frame::Message(body) => encode_frame(framing, body, &mut framed_again),
        }
    }
    let again = cut(framing, max, &framed_again, &[framed_again.len()]);
    assert_eq!(again.end, Ok(()), "frames framed again do not cut cleanly");
    assert_eq!(again.frames[..], whole.frames[..again.frames.len()], "frames framed again cut differently");
}

fn check_frame(framing: Framing, max: usize, frame: &Frame) {
    let Frame::Message(body) = frame else {
        assert_eq!(framing, Framing::LengthPrefixed, "a heartbeat in lines");
        return;
    };
    assert!(body.len() <= max, "a {}-byte frame passed the limit of {max}", body.len());
    assert!(!body.is_empty(), "an empty message frame");
    if framing == Framing::Lines {
        assert!(!body.contains(&b'\n'), "a line frame holds a newline");
        assert!(!body.iter().all(u8::is_ascii_whitespace), "a blank line became a message");
    }
    if let Ok(Some(device_id)) = parse_hello(framing, body) {
        assert_eq!(check_device_id(&device_id), Ok(()), "hello accepted {device_id:?}");
        assert!(device_id.len() <= MAX_DEVICE_ID_BYTES);
    }
}

/// Frames cut from a stream and how it ended (`Ok` when every byte became frames).
#[derive(Debug)]
struct Cut {
    frames: Vec<Frame>,
    end: Result<(), FrameError>,
}

/// Cuts `stream` read in pieces that end at `ends` (ascending, the last one the stream's
/// length), then ends the stream.
fn cut(framing: Framing, max: usize, stream: &[u8], ends: &[usize]) -> Cut {
    let mut framer = Framer::new(framing, max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for &end in ends {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        loop {
            match framer.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => return Cut { frames, end: Err(error) },
            }
        }
    }
    let end = match framer.finish(&mut buf) {
        Ok(Some(frame)) => {
            frames.push(frame);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(error) => Err(error),
    };
    Cut { frames, end }
}

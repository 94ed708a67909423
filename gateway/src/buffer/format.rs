//! The log's byte layout: segment headers, entry frames, ack slots and file names. Pure
//! functions over bytes, no I/O. All integers are little-endian.
//!
//! Segment file `{first_seq:020}.wal`:
//!
//! ```text
//! header (24 bytes)
//!   0..8    magic  "weirwal\0"
//!   8..10   format version (u16) = 1
//!   10..12  reserved, zero
//!   12..20  first sequence number (u64), equal to the one in the file name
//!   20..24  CRC32C of bytes 0..20
//! then frames, back to back, sequence numbers consecutive from the first:
//!   0..4    payload length n (u32)
//!   4..8    CRC32C of (bytes 0..4, bytes 8..16, payload)
//!   8..16   sequence number (u64)
//!   16..16+n payload (opaque to the log)
//! ```
//!
//! Ack file `ack`: two 4096-byte slots, each overwritten in place in turn (so acknowledging
//! needs no new disk block, even on a full disk); a slot is
//! `"weirack\0"`, version (u16), reserved (u16), acknowledged watermark (u64), CRC32C of the 20
//! bytes before it; the rest of the slot is zero. The valid slot with the highest watermark wins.

/// Magic bytes opening every segment.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"weirwal\0";
/// Magic bytes opening every ack slot.
pub(crate) const ACK_MAGIC: [u8; 8] = *b"weirack\0";
/// The segment and ack format this build writes and reads.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 24;
/// Bytes of a frame before its payload.
pub(crate) const FRAME_HEADER_LEN: u64 = 16;
/// Bytes of one ack slot (one filesystem block, so a torn write damages at most one slot).
pub(crate) const ACK_SLOT_LEN: u64 = 4096;
/// Bytes of an ack slot that carry data.
pub(crate) const ACK_RECORD_LEN: usize = 24;

/// The segment header for a segment whose first entry is `first_seq`.
pub(crate) fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

/// What a segment header says about its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderCheck {
    Valid,
    /// Wrong magic, wrong checksum, or a first sequence that is not the file name's.
    Invalid,
    /// A verified header of another format version.
    UnsupportedVersion(u16),
}

/// Checks a segment header against the first sequence taken from the file name.
pub(crate) fn check_segment_header(
    header: &[u8; SEGMENT_HEADER_LEN as usize],
    first_seq: u64,
) -> HeaderCheck {
    let crc = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    if header[0..8] != SEGMENT_MAGIC || crc32c::crc32c(&header[0..20]) != crc {
        return HeaderCheck::Invalid;
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return HeaderCheck::UnsupportedVersion(version);
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[12..20]);
    if u64::from_le_bytes(seq) != first_seq {
        return HeaderCheck::Invalid;
    }
    HeaderCheck::Valid
}

/// Bytes a frame with a `payload_len`-byte payload takes on disk.
pub(crate) fn frame_len(payload_len: u64) -> u64 {
    FRAME_HEADER_LEN + payload_len
}

/// The checksum a frame carries: CRC32C over its length, sequence number and payload.
fn frame_checksum(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &seq.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Appends the frame for entry `seq` to `out`. The caller has checked that the payload length
/// fits in a u32 (it is bounded by the segment size).
pub(crate) fn encode_frame(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(FRAME_HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_checksum(len, seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The fixed part of a frame, before its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub len: u32,
    pub crc: u32,
    pub seq: u64,
}

impl FrameHeader {
    pub(crate) fn decode(bytes: &[u8; FRAME_HEADER_LEN as usize]) -> Self {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[8..16]);
        FrameHeader {
            len: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            crc: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            seq: u64::from_le_bytes(seq),
        }
    }

    /// True when `payload` (of `self.len` bytes) is what this header was written for.
    pub(crate) fn verifies(&self, payload: &[u8]) -> bool {
        payload.len() == self.len as usize && frame_checksum(self.len, self.seq, payload) == self.crc
    }
}

/// One ack slot's 24 data bytes for watermark `acked`.
pub(crate) fn encode_ack_record(acked: u64) -> [u8; ACK_RECORD_LEN] {
    let mut record = [0u8; ACK_RECORD_LEN];
    record[0..8].copy_from_slice(&ACK_MAGIC);
    record[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    record[12..20].copy_from_slice(&acked.to_le_bytes());
    let crc = crc32c::crc32c(&record[0..20]);
    record[20..24].copy_from_slice(&crc.to_le_bytes());
    record
}

/// The watermark in an ack slot, if the slot verifies.
pub(crate) fn decode_ack_record(record: &[u8]) -> Option<u64> {
    let record = record.get(0..ACK_RECORD_LEN)?;
    let crc = u32::from_le_bytes([record[20], record[21], record[22], record[23]]);
    if record[0..8] != ACK_MAGIC
        || u16::from_le_bytes([record[8], record[9]]) != FORMAT_VERSION
        || crc32c::crc32c(&record[0..20]) != crc
    {
        return None;
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&record[12..20]);
    Some(u64::from_le_bytes(acked))
}

/// The file name of the segment whose first entry is `first_seq` (20 digits: any u64 fits, and
/// names sort like the numbers).
pub(crate) fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

/// The first sequence number of a segment file name, or `None` for any other file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&seq| seq > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent bitwise CRC32C (Castagnoli, reflected polynomial 0x82F63B78), to check
    /// the crate and the fixtures against.
    fn reference_crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(reference_crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn segment_header_fixture() {
        #[rustfmt::skip]
        let expected: [u8; 24] = [
            b'w', b'e', b'i', b'r', b'w', b'a', b'l', 0, // magic
            0x01, 0x00,                                  // version 1
            0x00, 0x00,                                  // reserved
            0x01, 0, 0, 0, 0, 0, 0, 0,                   // first seq 1
            0x31, 0x19, 0x60, 0x34,                      // CRC32C of the 20 bytes above
        ];
        assert_eq!(encode_segment_header(1), expected);
        assert_eq!(reference_crc32c(&expected[0..20]), 0x3460_1931);
        assert_eq!(check_segment_header(&expected, 1), HeaderCheck::Valid);
        // The file name says another first sequence.
        assert_eq!(check_segment_header(&expected, 2), HeaderCheck::Invalid);
        for bit in 0..24 * 8 {
            let mut flipped = expected;
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(check_segment_header(&flipped, 1), HeaderCheck::Invalid, "bit {bit}");
        }
    }

    #[test]
    fn other_version_with_valid_checksum_is_unsupported() {
        let mut header = encode_segment_header(9);
        header[8] = 2;
        let crc = crc32c::crc32c(&header[0..20]);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_segment_header(&header, 9), HeaderCheck::UnsupportedVersion(2));
    }

    #[test]
    fn frame_fixture() {
        let mut out = Vec::new();
        encode_frame(1, b"hi", &mut out);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x02, 0x00, 0x00, 0x00,   // payload length 2
            0xc8, 0x48, 0xcf, 0x11,   // CRC32C(length, seq, payload) = 0x11cf48c8
            0x01, 0, 0, 0, 0, 0, 0, 0, // seq 1
            b'h', b'i',               // payload
        ];
        assert_eq!(out, expected);
        let mut covered = Vec::new();
        covered.extend_from_slice(&expected[0..4]);
        covered.extend_from_slice(&expected[8..]);
        assert_eq!(reference_crc32c(&covered), 0x11cf_48c8);

        let header = FrameHeader::decode(expected[0..16].try_into().unwrap());
        assert_eq!(header, FrameHeader { len: 2, crc: 0x11cf_48c8, seq: 1 });
        assert!(header.verifies(b"hi"));
        assert!(!header.verifies(b"ho"));
        assert!(!header.verifies(b"hi!"), "length must match too");
    }

    #[test]
    fn empty_payload_frame_and_trailing_bytes() {
        let mut out = Vec::new();
        encode_frame(7, b"", &mut out);
        encode_frame(8, b"x", &mut out);
        // The first frame is exactly 16 bytes; what follows is the next frame, not its payload.
        assert_eq!(out.len(), 16 + 17);
        let first = FrameHeader::decode(out[0..16].try_into().unwrap());
        assert_eq!(first, FrameHeader { len: 0, crc: 0xd139_b059, seq: 7 });
        assert!(first.verifies(&[]));
        let second = FrameHeader::decode(out[16..32].try_into().unwrap());
        assert_eq!(second.seq, 8);
        assert!(second.verifies(&out[32..]));
    }

    #[test]
    fn zero_filled_bytes_never_verify() {
        // A crash can leave zero-filled blocks at the end of a file.
        let zeros = FrameHeader::decode(&[0u8; 16]);
        assert!(!zeros.verifies(&[]));
    }

    #[test]
    fn every_bit_flip_in_a_frame_is_detected() {
        let mut frame = Vec::new();
        encode_frame(42, b"payload", &mut frame);
        for bit in 0..frame.len() * 8 {
            let mut flipped = frame.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let header = FrameHeader::decode(flipped[0..16].try_into().unwrap());
            let ok = header.seq == 42 && header.verifies(&flipped[16..]);
            assert!(!ok, "bit {bit} flipped undetected");
        }
    }

    #[test]
    fn ack_record_fixture() {
        let record = encode_ack_record(42);
        #[rustfmt::skip]
        let expected: [u8; 24] = [
            b'w', b'e', b'i', b'r', b'a', b'c', b'k', 0, // magic
            0x01, 0x00,                                  // version 1
            0x00, 0x00,                                  // reserved
            42, 0, 0, 0, 0, 0, 0, 0,                     // watermark 42
            0x63, 0x30, 0x2c, 0xf7,                      // CRC32C = 0xf72c3063
        ];
        assert_eq!(record, expected);
        assert_eq!(decode_ack_record(&expected), Some(42));
        assert_eq!(decode_ack_record(&expected[..23]), None);
        assert_eq!(decode_ack_record(&[0u8; 24]), None);
        let mut flipped = expected;
        flipped[12] ^= 1;
        assert_eq!(decode_ack_record(&flipped), None);
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(1), "00000000000000000001.wal");
        assert_eq!(segment_file_name(u64::MAX), "18446744073709551615.wal");
        assert_eq!(parse_segment_file_name("00000000000000000001.wal"), Some(1));
        assert_eq!(parse_segment_file_name("18446744073709551615.wal"), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("00000000000000000000.wal"), None);
        assert_eq!(parse_segment_file_name("1.wal"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000x.wal"), None);
        assert_eq!(parse_segment_file_name("99999999999999999999.wal"), None, "overflows u64");
        assert_eq!(parse_segment_file_name("00000000000000000001.wal.tmp"), None);
        assert_eq!(parse_segment_file_name("ack"), None);
    }

    proptest::proptest! {
        /// Every frame decodes to what was encoded, and verifies only with its own payload.
        #[test]
        fn frame_round_trip(seq in proptest::prelude::any::<u64>(), payload in proptest::collection::vec(0u8..=255, 0..300)) {
            let mut out = vec![0xee]; // bytes before the frame stay untouched
            encode_frame(seq, &payload, &mut out);
            proptest::prop_assert_eq!(out.len() as u64, 1 + frame_len(payload.len() as u64));
            let header = FrameHeader::decode(out[1..17].try_into().unwrap());
            proptest::prop_assert_eq!((header.len as usize, header.seq), (payload.len(), seq));
            proptest::prop_assert!(header.verifies(&out[17..]));
            let mut other = payload.clone();
            other.push(0);
            proptest::prop_assert!(!header.verifies(&other));
        }

        #[test]
        fn header_and_ack_round_trip(value in 1..u64::MAX) {
            proptest::prop_assert_eq!(check_segment_header(&encode_segment_header(value), value), HeaderCheck::Valid);
            proptest::prop_assert_eq!(decode_ack_record(&encode_ack_record(value)), Some(value));
            proptest::prop_assert_eq!(parse_segment_file_name(&segment_file_name(value)), Some(value));
        }
    }
}

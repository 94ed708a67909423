//! The disk buffer's fuzz corpus (`gateway/fuzz/corpus/wal_segments`) as a regression suite on
//! the stable toolchain: every input goes through the fuzz target's own checks. The seeds were
//! real log directories written by the log itself (`cargo test -p weir --test wal_corpus --
//! --ignored write_seed_corpus` writes them again as `seed-*`); `cargo fuzz cmin` has since
//! folded them into the corpus under content-hash names. `regression-*` inputs are crashes
//! that were fixed.

use std::fs;
use std::path::{Path, PathBuf};

use weir::buffer::fuzzing::{directory_input, segment_files};
use weir::buffer::{Wal, WalOptions};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wal_segments")
}

#[test]
fn every_corpus_input_passes_the_fuzz_checks() {
    let mut inputs: Vec<PathBuf> =
        fs::read_dir(corpus_dir()).expect("the corpus").map(|e| e.expect("corpus entry").path()).collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "corpus has only {} inputs", inputs.len());
    for input in &inputs {
        let data = fs::read(input).expect("read an input");
        let outcome = std::panic::catch_unwind(|| segment_files(&data));
        assert!(outcome.is_ok(), "{} failed the fuzz checks", input.display());
    }
    println!("wal corpus: {} inputs replayed", inputs.len());
}

/// A segment size the fuzz input can express (64 + 16 n).
const SMALL: u64 = 64 + 16 * 6; // 160: three 20-byte entries per segment
const TINY: u64 = 64;

fn options(segment_bytes: u64) -> WalOptions {
    WalOptions { segment_bytes, max_bytes: 1 << 20 }
}

/// A log with `count` entries of growing sizes, synced, then acknowledged up to `acked`.
fn write_log(dir: &Path, segment_bytes: u64, count: u8, acked: u64) {
    let (mut wal, _) = Wal::open(dir, options(segment_bytes)).unwrap();
    let max = options(segment_bytes).max_entry_bytes() as usize;
    for i in 0..count {
        let len = (usize::from(i) * 5) % (max + 1);
        wal.append(&vec![b'a' + i % 26; len]).unwrap();
    }
    wal.sync().unwrap();
    if acked > 0 {
        wal.ack(acked).unwrap();
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

fn edit(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(path).unwrap();
    change(&mut bytes);
    fs::write(path, bytes).unwrap();
}

/// The input with its raw segment records (kind 0, see `weir::buffer::fuzzing`) turned into
/// resealed ones (kind 1); `None` when it has none.
fn resealed(mut input: Vec<u8>) -> Option<Vec<u8>> {
    let mut changed = false;
    let mut pos = 1;
    while pos < input.len() {
        match input[pos] {
            0 => {
                input[pos] = 1;
                changed = true;
                let len = u16::from_le_bytes([input[pos + 9], input[pos + 10]]);
                pos += 11 + usize::from(len);
            }
            2 => pos += 3 + usize::from(u16::from_le_bytes([input[pos + 1], input[pos + 2]])),
            3 => pos += 49,
            5 => pos += 9,
            other => panic!("unexpected record kind {other}"),
        }
    }
    changed.then_some(input)
}

/// A seed's name, the segment size it is written and opened with, and what writes it.
type Seed = (&'static str, u64, Box<dyn Fn(&Path)>);

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_corpus() {
    let out = corpus_dir();
    fs::create_dir_all(&out).unwrap();
    let seeds: Vec<Seed> = vec![
        ("fresh", SMALL, Box::new(|dir| drop(Wal::open(dir, options(SMALL)).unwrap()))),
        ("one-segment", 64 + 16 * 40, Box::new(|dir| write_log(dir, 64 + 16 * 40, 5, 0))),
        ("segments", SMALL, Box::new(|dir| write_log(dir, SMALL, 10, 0))),
        ("tiny-segments", TINY, Box::new(|dir| write_log(dir, TINY, 6, 0))),
        ("acked-middle", SMALL, Box::new(|dir| write_log(dir, SMALL, 10, 5))),
        ("acked-all", SMALL, Box::new(|dir| write_log(dir, SMALL, 6, 6))),
        (
            "acked-then-crash-before-delete",
            SMALL,
            Box::new(|dir| {
                // The watermark is stored, the crash comes before the segments are deleted.
                write_log(dir, SMALL, 9, 0);
                let keep: Vec<_> = segments(dir).iter().map(|p| (p.clone(), fs::read(p).unwrap())).collect();
                let (mut wal, _) = Wal::open(dir, options(SMALL)).unwrap();
                wal.ack(7).unwrap();
                drop(wal);
                for (path, bytes) in keep {
                    fs::write(path, bytes).unwrap();
                }
            }),
        ),
        (
            "torn-tail",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 8, 0);
                let last = segments(dir).pop().unwrap();
                edit(&last, |b| b.truncate(b.len() - 3));
            }),
        ),
        (
            "torn-header",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 6, 0);
                let last = segments(dir).pop().unwrap();
                edit(&last, |b| b.truncate(10));
            }),
        ),
        (
            "bad-payload-middle",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 10, 0);
                edit(&segments(dir)[1], |b| *b.last_mut().unwrap() ^= 1);
            }),
        ),
        (
            "bad-length-middle",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 10, 0);
                edit(&segments(dir)[1], |b| b[24] ^= 0x10);
            }),
        ),
        (
            "bad-header",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 10, 0);
                edit(&segments(dir)[0], |b| b[3] ^= 0xff);
            }),
        ),
        (
            "wrong-sequence",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 10, 0);
                let files = segments(dir);
                let first = fs::read(&files[0]).unwrap();
                fs::write(&files[1], first).unwrap();
            }),
        ),
        (
            "ack-garbage",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 8, 4);
                fs::write(dir.join("ack"), b"not an ack file").unwrap();
            }),
        ),
        (
            "ack-missing",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 8, 0);
                fs::remove_file(dir.join("ack")).unwrap();
            }),
        ),
        (
            "ack-one-slot-torn",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 8, 3);
                let (mut wal, _) = Wal::open(dir, options(SMALL)).unwrap();
                wal.ack(5).unwrap();
                drop(wal);
                edit(&dir.join("ack"), |b| b[4096 + 13] ^= 1);
            }),
        ),
        (
            "unreadable-segment",
            SMALL,
            Box::new(|dir| {
                write_log(dir, SMALL, 4, 0);
                fs::create_dir(dir.join("00000000000000000002.wal")).unwrap();
            }),
        ),
    ];
    let mut written = 0;
    for (name, segment_bytes, make) in seeds {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path());
        let input = directory_input(dir.path(), segment_bytes).unwrap();
        fs::write(out.join(format!("seed-{name}")), &input).unwrap();
        written += 1;
        // The same directory with its segments marked for resealing, so that the fuzzer starts
        // with examples of that kind too.
        if let Some(resealed) = resealed(input) {
            fs::write(out.join(format!("seed-{name}-resealed")), resealed).unwrap();
            written += 1;
        }
    }
    println!("wrote {written} seeds to {}", out.display());
}

//! The fuzz corpora (`protocols/fuzz/corpus/<target>`) as a regression suite on the stable
//! toolchain: every committed input goes through its target's own checks
//! (`weir_protocols::fuzzing`). The seeds were written by weir's encoders (`cargo test -p
//! weir-protocols --test fuzz_corpus -- --ignored write_seed_corpus` writes them again as
//! `seed-*`); `cargo fuzz cmin` (see `protocols/fuzz/run.sh`) has since folded them into the
//! corpus under content-hash names.
//! `regression-*` inputs are the crashes found (a bug in weir, or a check of the harness that
//! was wrong), named after what they showed.

use std::fs;
use std::path::{Path, PathBuf};

use weir_protocols::fuzzing::{seeds, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut inputs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_corpus_input_passes_its_fuzz_checks() {
    let mut failed = Vec::new();
    for (target, check) in TARGETS {
        let inputs = inputs(target);
        assert!(inputs.len() >= 5, "corpus {target} has only {} inputs", inputs.len());
        for input in &inputs {
            let data = fs::read(input).expect("read an input");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(input.display().to_string());
            }
        }
        println!("{target}: {} inputs replayed", inputs.len());
    }
    assert!(failed.is_empty(), "inputs failing their fuzz checks: {failed:#?}");
}

#[test]
fn every_fuzz_target_has_a_corpus_and_a_cargo_fuzz_binary() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml")).unwrap();
    for (target, _) in TARGETS {
        assert!(corpus_dir(target).is_dir(), "no corpus for {target}");
        assert!(manifest.contains(&format!("name = \"{target}\"")), "no [[bin]] {target} in fuzz/Cargo.toml");
    }
}

/// The seeds pass their own checks (so a corpus built from them starts clean).
#[test]
fn seeds_pass_their_fuzz_checks() {
    for (target, name, input) in seeds::all() {
        let (_, check) = TARGETS.iter().find(|(t, _)| *t == target).expect("a known target");
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(outcome.is_ok(), "seed {target}/{name} fails its checks");
    }
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_corpus() {
    let mut written = 0;
    for (target, name, input) in seeds::all() {
        let dir = corpus_dir(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{name}")), input).unwrap();
        written += 1;
    }
    println!("wrote {written} seeds");
}

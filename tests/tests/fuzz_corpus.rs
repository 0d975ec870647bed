//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`: seeds, and every input a fuzz
//! run found a problem with) through the fuzz targets, so the test suite keeps what fuzzing
//! found fixed. The targets themselves are `fuzz/src/lib.rs`, compiled here as a module;
//! `fuzz/run.sh` runs them under libFuzzer.
#[path = "../../fuzz/src/lib.rs"]
mod targets;

#[test]
fn every_committed_fuzz_input_is_answered_without_a_panic() {
    let root = freshet_tests::repo().join("fuzz/corpus");
    let mut total = 0;
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!inputs.is_empty(), "no corpus for {name}");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
            total += 1;
        }
    }
    eprintln!("{total} inputs replayed");
}

#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) under libFuzzer for a bounded time, starting from
# the committed corpus in fuzz/corpus/<target>. Inputs that reach new code collect in
# fuzz/target/corpus/<target> (commit the ones worth keeping into fuzz/corpus: the test suite
# replays that directory); an input that crashes, hangs or allocates too much is written to
# fuzz/artifacts/<target>/ and the script exits 1.
#
#   fuzz/run.sh                      # all targets, FUZZ_SECONDS (default 60) each
#   FUZZ_SECONDS=600 fuzz/run.sh sql_expr
#
# Needs the nightly toolchain and cargo-fuzz; both are installed when missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(json_lines csv_lines job_file sql_expr data_frames checkpoint_metadata)
cargo +nightly fuzz build
status=0
for t in "${targets[@]}"; do
  work="target/corpus/$t"
  mkdir -p "$work" "artifacts/$t"
  # -malloc_limit_mb: one allocation above it is a finding (a length field trusted too far)
  if ! cargo +nightly fuzz run "$t" "$work" "corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
      -print_final_stats=1; then
    echo "fuzz target $t found a problem: fuzz/artifacts/$t" >&2
    status=1
  fi
done
exit $status

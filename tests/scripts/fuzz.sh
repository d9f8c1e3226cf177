#!/usr/bin/env bash
# The fuzz targets (cargo-fuzz, libFuzzer, nightly): builds each fuzz crate and runs each of
# its targets for KT_FUZZ_SECONDS (default 60) from its committed seeds (fuzz/corpus/<target>,
# read only; what a run finds goes to a temporary directory) and dictionary, if any
# (fuzz/dict/<target>). Fails on a crash, panic, failed property or hang (over 10 s for one
# input) in any target, once all have run: the input is left in <crate>/artifacts/<target>/
# (reproduce with `cargo +nightly fuzz run <target> <file>`).
# Prints the build and run seconds and each target's executions per second.
#
# Built with `--sanitizer none` and debug assertions: the targets are safe Rust, so what is
# looked for is a panic, an overflow or a broken property, not the memory errors
# AddressSanitizer finds; this keeps the build (all of kt-cli and kt-node-agent with
# coverage instrumentation) and every execution much faster.
#
#   tests/scripts/fuzz.sh [crate-dir...]   default: every fuzz crate
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
root=$PWD
seconds=${KT_FUZZ_SECONDS:-60}
# One target directory for the three crates: their common dependencies build once.
target_dir=${KT_FUZZ_TARGET_DIR:-$root/target/fuzz}
crates=("$@")
[ ${#crates[@]} -gt 0 ] || crates=(kt-node-agent/proto/fuzz kt-cli/fuzz kt-node-agent/fuzz)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Every crate built first, then the targets run side by side, KT_FUZZ_JOBS at a time (default:
# one per core; each libFuzzer process uses one), so CI waits for the fuzzing about
# KT_FUZZ_SECONDS × targets / cores instead of × targets.
summary=()
runs=()
for crate in "${crates[@]}"; do
    cd "$root/$crate"
    # cargo fuzz has no --locked: this fails when Cargo.lock would change.
    cargo +nightly fetch --locked >/dev/null
    start=$(date +%s)
    cargo +nightly fuzz build -s none -a --target-dir "$target_dir"
    summary+=("build $crate: $(($(date +%s) - start)) s")
    for target in $(cargo +nightly fuzz list); do
        runs+=("$crate $target")
    done
done

# Runs one target; leaves its summary line in $scratch/<target>.ok when it found nothing.
run_target() {
    local crate=$1 target=$2
    cd "$root/$crate"
    mkdir -p "$scratch/$target"
    # A libFuzzer dictionary (the format's keywords) where the crate has one.
    local dict=()
    [ -f "dict/$target" ] && dict=("-dict=dict/$target")
    local start
    start=$(date +%s)
    cargo +nightly fuzz run -s none -a --target-dir "$target_dir" "$target" \
        "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}" \
        2>"$scratch/$target.log" || return 1
    local execs rate
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$scratch/$target.log")
    echo "run $target: $(($(date +%s) - start)) s, $execs executions, $rate/s, no crash" \
        >"$scratch/$target.ok"
}

jobs_max=${KT_FUZZ_JOBS:-$(nproc)}
start=$(date +%s)
for run in "${runs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
        wait -n || true
    done
    # shellcheck disable=SC2086 # "crate target", split on purpose
    run_target $run &
done
wait
failed=0
for run in "${runs[@]}"; do
    read -r crate target <<<"$run"
    if [ -f "$scratch/$target.ok" ]; then
        summary+=("$(cat "$scratch/$target.ok")")
    else
        tail -n 60 "$scratch/$target.log" >&2 || true
        echo "fuzz target $crate $target failed: see $crate/artifacts/$target/" >&2
        failed=1
    fi
done
summary+=("all runs, $jobs_max at a time: $(($(date +%s) - start)) s")
printf '[fuzz] %s\n' "${summary[@]}"
exit "$failed"

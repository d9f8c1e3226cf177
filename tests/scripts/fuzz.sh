#!/usr/bin/env bash
# The fuzz targets (cargo-fuzz, libFuzzer, nightly): builds each fuzz crate and runs each of
# its targets for KT_FUZZ_SECONDS (default 60) from its committed seeds (fuzz/corpus/<target>,
# read only; what a run finds goes to a temporary directory) and dictionary, if any
# (fuzz/dict/<target>). Fails on the first crash, panic, failed property or hang (over 10 s
# for one input): the input is left in <crate>/artifacts/<target>/ (reproduce with
# `cargo +nightly fuzz run <target> <file>`).
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

summary=()
for crate in "${crates[@]}"; do
    cd "$root/$crate"
    # cargo fuzz has no --locked: this fails when Cargo.lock would change.
    cargo +nightly fetch --locked >/dev/null
    start=$(date +%s)
    cargo +nightly fuzz build -s none -a --target-dir "$target_dir"
    summary+=("build $crate: $(($(date +%s) - start)) s")
    for target in $(cargo +nightly fuzz list); do
        mkdir -p "$scratch/$target"
        # A libFuzzer dictionary (the format's keywords) where the crate has one.
        dict=()
        [ -f "dict/$target" ] && dict=("-dict=dict/$target")
        start=$(date +%s)
        cargo +nightly fuzz run -s none -a --target-dir "$target_dir" "$target" \
            "$scratch/$target" "corpus/$target" -- \
            -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}" \
            2>"$scratch/$target.log" || {
            tail -n 60 "$scratch/$target.log" >&2
            echo "fuzz target $crate $target failed: see $crate/artifacts/$target/" >&2
            exit 1
        }
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$scratch/$target.log")
        summary+=("run $target: $(($(date +%s) - start)) s, $execs executions, $rate/s, no crash")
    done
done
printf '[fuzz] %s\n' "${summary[@]}"

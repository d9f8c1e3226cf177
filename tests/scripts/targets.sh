#!/usr/bin/env bash
# `tests/run targets`: ktctl and kt-node-agent as static binaries for x86_64 and aarch64
# Linux (musl), each checked with `file` to be statically linked and run for `--version`
# (aarch64 under qemu-aarch64, user-mode emulation); kt's OCI images built from them and checked (tests/scripts/images.sh); and
# kt-cli type-checked for macOS and Windows (x86_64; GNU ABI on Windows), whose builds are
# not run here (the target_os cfgs are what differs; one architecture each keeps CI short).
# Binaries land in target/<triple>/release/ (or $CARGO_TARGET_DIR/<triple>/release/), the
# images in target/kt-images/.
set -euo pipefail
cd "$(dirname "$0")/../.."
target_dir=${CARGO_TARGET_DIR:-target}

log() { printf '[targets] %s\n' "$*" >&2; }

# ring (rustls, russh) compiles C: musl-gcc for x86_64; Debian's aarch64 cross gcc for
# aarch64, also as the linker (Rust's musl targets bring their own crt objects and libc).
export CC_x86_64_unknown_linux_musl=musl-gcc
export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
# No Apple SDK on Linux: clang with stand-ins for the few SDK headers ring includes, enough
# for `cargo check` (nothing is linked).
sdk_stub="$PWD/.ci/macos-sdk-stub"
export CC_x86_64_apple_darwin=clang
export CFLAGS_x86_64_apple_darwin="-ffreestanding -I$sdk_stub"

# The agent embeds its eBPF object, which its build script builds with the nightly for
# bpfel-unknown-none whatever the host target (aya-build), so it cross-builds like ktctl.
# Both binaries in one cargo run per target: their dependencies are built once.
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    log "building a static ktctl and kt-node-agent for $target"
    cargo build --release --locked -p kt-cli --bin ktctl -p kt-node-agent --bin kt-node-agent \
        --target "$target"
    for name in ktctl kt-node-agent; do
        binary="$target_dir/$target/release/$name"
        description=$(file -b "$binary")
        log "$binary: $description"
        case "$description" in
            *"statically linked"* | *"static-pie linked"*) ;;
            *) echo "$binary is not statically linked: $description" >&2; exit 1 ;;
        esac
        arch=${target%%-*}
        case "$arch:$description" in
            x86_64:*x86-64* | aarch64:*aarch64*) ;;
            *) echo "$binary is not an $arch binary: $description" >&2; exit 1 ;;
        esac
    done
done

for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    emulator=()
    [ "$target" = aarch64-unknown-linux-musl ] && emulator=(qemu-aarch64)
    for name in ktctl kt-node-agent; do
        version=$("${emulator[@]}" "$target_dir/$target/release/$name" --version)
        log "$version"
        case "$name:$version" in
            "ktctl:ktctl version "*", $target)") ;;
            "kt-node-agent:kt-node-agent "*", $target)") ;;
            *) echo "unexpected --version of the static $name: $version" >&2; exit 1 ;;
        esac
    done
done

# The images, from the agent binaries just built.
bash tests/scripts/images.sh

for target in x86_64-apple-darwin x86_64-pc-windows-gnu; do
    log "checking kt-cli for $target"
    cargo check --locked -p kt-cli --target "$target"
done
log "done"

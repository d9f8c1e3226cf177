#!/usr/bin/env bash
# `tests/run targets`: ktctl as one static binary for x86_64 and aarch64 Linux (musl), each
# checked with `file` to be statically linked and the x86_64 one run for `--version`; and
# kt-cli type-checked for macOS and Windows (x86_64; GNU ABI on Windows), whose builds are
# not run here (the target_os cfgs are what differs; one architecture each keeps CI short).
# Binaries land in target/<triple>/release/ktctl.
set -euo pipefail
cd "$(dirname "$0")/../.."

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

for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    log "building a static ktctl for $target"
    cargo build --release --locked -p kt-cli --bin ktctl --target "$target"
    binary="target/$target/release/ktctl"
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

version=$(target/x86_64-unknown-linux-musl/release/ktctl --version)
log "$version"
case "$version" in
    "ktctl version "*", x86_64-unknown-linux-musl)") ;;
    *) echo "unexpected --version of the static ktctl: $version" >&2; exit 1 ;;
esac

for target in x86_64-apple-darwin x86_64-pc-windows-gnu; do
    log "checking kt-cli for $target"
    cargo check --locked -p kt-cli --target "$target"
done
log "done"

#!/usr/bin/env bash
# Installs everything the build, the tests, the benchmarks and the demo need on a fresh
# Debian 12 machine. Idempotent: a second run checks and changes nothing, in seconds.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup needs root (apt packages, eBPF, network namespaces): run it with sudo" >&2
        exit 1
    fi
}

apt_packages=(
    iproute2        # ip netns / veth / routes in the test namespaces
    nftables        # kube-proxy of the testbed
    iptables        # coexistence checks
    openssh-server  # sshd: the v0.3.7 shadow contract and the benchmark baseline
    openssh-client  # ssh -L / -R interop and baseline
    util-linux      # unshare, nsenter
    procps          # ps, pgrep in diagnostics
    curl            # demo clients, the curlimages/curl image of the testbed
    dnsutils        # dig: connect's DNS tests and benchmark
    sshuttle        # connect --mode sshuttle, and the benchmark baseline
    nginx-light     # the testbed's nginx image (tutorials' nginx, nginx:alpine)
    busybox         # applets for the testbed's busybox and alpine images
    ca-certificates
    pkg-config
    build-essential
    libssl-dev
    zlib1g-dev      # bpf-linker links LLVM, which needs zlib
    libzstd-dev
    patch           # kt-tunnel/vendor/verify-russh.sh applies kt.patch
    faketime        # libfaketime: a ktctl whose clock is an hour off (heartbeats, session GC)
    file            # tests/run targets: says a ktctl is statically linked
    musl-tools      # static x86_64 ktctl: musl-gcc for ring's C code
    gcc-aarch64-linux-gnu  # static aarch64 ktctl: ring's C code and the link
    libc6-dev-arm64-cross  # its C headers: only Recommended by gcc-aarch64-linux-gnu, which
                           # --no-install-recommends leaves out (ring's build then fails on
                           # bits/libc-header-start.h)
    clang           # kt-cli checked for macOS: ring's C code for an Apple target
    gcc-mingw-w64-x86-64   # kt-cli checked for Windows (x86_64-pc-windows-gnu)
    buildah         # tests/run targets: kt's OCI images (tests/scripts/images.sh)
    jq              # tests/run targets: reads the image archives' index, manifests and configs
    qemu-user       # tests/run targets: runs the aarch64 binaries (qemu-aarch64, called by name;
                    # no binfmt registration: its recommended qemu-user-binfmt is not installed)
    dbus-daemon     # the workstation's own system bus, for systemd-resolved (below)
    dbus-bin        # dbus-send: waits for that bus
    # What the unpacked systemd-resolved (below) links besides libc, where a minimal Debian
    # lacks it (no systemd installed).
    libip4tc2 libkmod2 libseccomp2 libpam0g libgcrypt20 liblz4-1 libcap2 libacl1 libssl3
    libcrypt1 libaudit1 libcap-ng0 libzstd1 liblzma5 libselinux1 libmount1 libblkid1
)

# What `tests/run targets` builds and checks kt-cli for besides this machine's target.
rust_targets=(
    x86_64-unknown-linux-musl
    aarch64-unknown-linux-musl
    x86_64-apple-darwin
    x86_64-pc-windows-gnu
)

install_apt() {
    local missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "apt packages present"
        return
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts sshd on the host; the tests run their own sshd in namespaces.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now ssh >/dev/null 2>&1 || true
    fi
}

install_rust_src() {
    if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
        log "nightly rust-src present"
    else
        log "adding rust-src to the nightly toolchain"
        rustup component add rust-src --toolchain nightly
    fi
}

# bpf-linker 0.13 cannot use Debian's LLVM 14: link it against the nightly's own libLLVM
# (shared/reference/ebpf-notes.md §2.1). The LLVM major comes from `rustc +nightly -vV`.
install_bpf_linker() {
    local want="0.13.0"
    if command -v bpf-linker >/dev/null 2>&1 \
        && rustup run nightly bpf-linker --version 2>/dev/null | grep -q "$want"; then
        log "bpf-linker $want present"
        return
    fi
    local sysroot major libllvm prefix
    sysroot=$(rustc +nightly --print sysroot)
    major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    libllvm=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n 1)
    if [ -z "$major" ] || [ -z "$libllvm" ]; then
        echo "cannot find the nightly's libLLVM under $sysroot/lib" >&2
        exit 1
    fi
    prefix="${CARGO_HOME:-$HOME/.cargo}/kt-llvm-$major"
    mkdir -p "$prefix/lib"
    ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
    log "building bpf-linker $want against $(basename "$libllvm") (LLVM $major), takes a few minutes"
    LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$sysroot/lib" \
        cargo install bpf-linker --locked --version "$want" \
        --no-default-features --features "llvm-$major"
}

install_rust_targets() {
    local installed missing=()
    installed=$(rustup target list --installed)
    for t in "${rust_targets[@]}"; do
        grep -qx "$t" <<<"$installed" || missing+=("$t")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "rust targets present"
    else
        log "adding rust targets: ${missing[*]}"
        rustup target add "${missing[@]}"
    fi
}

# cargo-fuzz runs the fuzz targets (tests/scripts/fuzz.sh; libFuzzer, with the nightly).
install_cargo_fuzz() {
    local want="0.13.2"
    if cargo fuzz --version 2>/dev/null | grep -q "$want"; then
        log "cargo-fuzz $want present"
        return
    fi
    log "building cargo-fuzz $want"
    cargo install cargo-fuzz --locked --version "$want"
}

# mdBook renders docs/ (a CI step; not packaged in Debian 12). Without its default
# features: no `serve`/`watch` (a local web server and file watcher), no search index.
install_mdbook() {
    local want="0.5.4"
    if mdbook --version 2>/dev/null | grep -q "v$want"; then
        log "mdbook $want present"
        return
    fi
    log "building mdbook $want"
    cargo install mdbook --locked --version "$want" --no-default-features
}

need_root
# systemd-resolved, for connect's test on a workstation whose DNS it runs: unpacked (with the
# libsystemd-shared of its version) under /opt/kt-testbed, never installed — the package
# would make the host's /etc/resolv.conf a link to its stub. The tests run it only inside
# the testbed's workstation namespace (tests/src/harness/resolved.rs).
resolved_root=/opt/kt-testbed/systemd-resolved
install_systemd_resolved() {
    if [ -x "$resolved_root/lib/systemd/systemd-resolved" ]; then
        log "systemd-resolved unpacked"
        return
    fi
    log "unpacking systemd-resolved into $resolved_root"
    local version scratch
    version=$(apt-cache show --no-all-versions systemd-resolved 2>/dev/null | sed -n 's/^Version: //p')
    if [ -z "$version" ]; then
        apt-get update -qq
        version=$(apt-cache show --no-all-versions systemd-resolved | sed -n 's/^Version: //p')
    fi
    scratch=$(mktemp -d)
    # apt-get download writes as _apt when it can.
    chown _apt "$scratch" 2>/dev/null || true
    (cd "$scratch" && apt-get download -qq "systemd-resolved=$version" "libsystemd-shared=$version")
    mkdir -p "$(dirname "$resolved_root")"
    rm -rf "$resolved_root.partial"
    for deb in "$scratch"/*.deb; do
        dpkg-deb -x "$deb" "$resolved_root.partial"
    done
    rm -rf "$scratch" "$resolved_root"
    mv "$resolved_root.partial" "$resolved_root"
}

install_apt
install_systemd_resolved
install_rust_targets
install_rust_src
install_bpf_linker
install_cargo_fuzz
install_mdbook
log "done"

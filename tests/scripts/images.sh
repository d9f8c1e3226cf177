#!/usr/bin/env bash
# kt's OCI images, built with buildah from the static (musl) kt-node-agent that
# tests/scripts/targets.sh builds (`tests/run targets` runs this as its last step; run alone
# it uses the binaries already there): for amd64 and arm64, from deploy/images/*.Containerfile
# (FROM scratch, no registry involved), named from deploy/images.env (kt_proto::images):
#
#   <target dir>/kt-images/kt-node-agent-<arch>.tar   the node agent (roles agent, shadow, router)
#   <target dir>/kt-images/kt-shadow-<arch>.tar       kt's shadow for `ktctl --image`
#
# each an OCI archive of one image named <REGISTRY>/<image>:<TAG> (deploy/README.md, "Images",
# says how to load or push them). Then each archive is checked as a runtime would see it:
# index.json → manifest → config (os, architecture, entrypoint) and layers, unpacked into a
# temporary root; the entrypoint's binary must be static and of the image's architecture, and
# the entrypoint runs with `--version`, which must name this commit and target (arm64 under
# qemu-aarch64, user-mode emulation called by name, which setup.sh installs).
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '[images] %s\n' "$*" >&2; }
fail() { printf '[images] %s\n' "$*" >&2; exit 1; }

# REGISTRY, AGENT_IMAGE, SHADOW_IMAGE, TAG.
. deploy/images.env
target_dir=${CARGO_TARGET_DIR:-target}
out="$target_dir/kt-images"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# Layer and config times are the commit's: the same commit builds the same image.
timestamp=$(git log -1 --format=%ct 2>/dev/null || echo 0)
work=$(mktemp -d "${TMPDIR:-/tmp}/kt-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

triple() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-musl ;;
        arm64) echo aarch64-unknown-linux-musl ;;
    esac
}

# What `file` says of a binary of each architecture.
file_arch() {
    case "$1" in
        amd64) echo x86-64 ;;
        arm64) echo aarch64 ;;
    esac
}

# binutils' strip for each architecture (build-essential; gcc-aarch64-linux-gnu's binutils).
strip_tool() {
    case "$1" in
        amd64) echo strip ;;
        arm64) echo aarch64-linux-gnu-strip ;;
    esac
}

# build IMAGE CONTAINERFILE ARCH: one image into $out/IMAGE-ARCH.tar.
build() {
    local image=$1 containerfile=$2 arch=$3
    local context="$work/context-$arch" local_name="localhost/kt-images-build/$image:$TAG-$arch"
    local archive="$out/$image-$arch.tar"
    rm -f "$archive"
    buildah build --quiet --os linux --arch "$arch" --timestamp "$timestamp" \
        --build-arg "VERSION=$TAG" --build-arg "REVISION=$commit" \
        -f "deploy/images/$containerfile" -t "$local_name" "$context" >/dev/null
    buildah push --quiet "$local_name" "oci-archive:$archive:$REGISTRY/$image:$TAG"
    # The archive is the product: nothing stays in buildah's local storage.
    buildah rmi "$local_name" >/dev/null
    log "$archive: $REGISTRY/$image:$TAG ($arch), $(du -h "$archive" | cut -f1)"
}

# stage ARCH: the build context both Containerfiles take.
stage() {
    local arch=$1 binary
    binary="$target_dir/$(triple "$arch")/release/kt-node-agent"
    [ -x "$binary" ] || fail "$binary is missing: tests/run targets builds it"
    local rootfs="$work/context-$arch/rootfs"
    mkdir -p "$rootfs/usr/local/bin" "$rootfs/usr/sbin" "$rootfs/var/kt-router"
    # Without its symbol table (a fifth of the file); the embedded eBPF object is data and stays.
    "$(strip_tool "$arch")" -o "$rootfs/usr/local/bin/kt-node-agent" "$binary"
    # v0.3.7's router command, which ktctl execs in a router pod; a writable state directory.
    ln -s /usr/local/bin/kt-node-agent "$rootfs/usr/sbin/router"
}

# check IMAGE ARCH: unpacks the archive and checks it (see the top of this file).
check() {
    local image=$1 arch=$2
    local archive="$out/$image-$arch.tar" dir="$work/check-$image-$arch"
    mkdir -p "$dir/oci" "$dir/rootfs"
    tar -xf "$archive" -C "$dir/oci"
    blob() { echo "$dir/oci/blobs/${1/://}"; }
    local index="$dir/oci/index.json"
    [ "$(jq '.manifests | length' "$index")" = 1 ] || fail "$archive: not one image: $(cat "$index")"
    local name
    name=$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"]' "$index")
    [ "$name" = "$REGISTRY/$image:$TAG" ] || fail "$archive is named $name, not $REGISTRY/$image:$TAG"
    local manifest config
    manifest=$(blob "$(jq -r '.manifests[0].digest' "$index")")
    config=$(blob "$(jq -r '.config.digest' "$manifest")")
    local platform
    platform=$(jq -r '.os + "/" + .architecture' "$config")
    [ "$platform" = "linux/$arch" ] || fail "$archive is for $platform, not linux/$arch"
    # Layers in order, each over the last (FROM scratch: one).
    local media digest
    while read -r media digest; do
        case "$media" in
            *.tar+gzip) tar -xzf "$(blob "$digest")" -C "$dir/rootfs" ;;
            *.tar) tar -xf "$(blob "$digest")" -C "$dir/rootfs" ;;
            *) fail "$archive: layer $digest is $media" ;;
        esac
    done < <(jq -r '.layers[] | .mediaType + " " + .digest' "$manifest")
    local -a entrypoint
    mapfile -t entrypoint < <(jq -r '.config.Entrypoint[]' "$config")
    [ ${#entrypoint[@]} -gt 0 ] || fail "$archive has no entrypoint"
    local binary="$dir/rootfs${entrypoint[0]}" description
    [ -f "$binary" ] || fail "$archive: the entrypoint ${entrypoint[0]} is not in the image"
    description=$(file -b "$binary")
    case "$description" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) fail "$archive: ${entrypoint[0]} is not statically linked: $description" ;;
    esac
    case "$description" in
        *"$(file_arch "$arch")"*) ;;
        *) fail "$archive: ${entrypoint[0]} is not an $arch binary: $description" ;;
    esac
    local want="$TAG (commit $commit, $(triple "$arch"))" version
    # The entrypoint as a runtime starts it (the role included), asked for its version.
    local -a emulator=()
    [ "$arch" = arm64 ] && emulator=(qemu-aarch64)
    version=$("${emulator[@]}" "$binary" "${entrypoint[@]:1}" --version) \
        || fail "$archive: '${entrypoint[*]} --version' failed"
    case "$version" in
        *" $want") ;;
        *) fail "$archive: '${entrypoint[*]} --version' says '$version', not '… $want'" ;;
    esac
    log "$image-$arch: '${entrypoint[*]} --version': $version${emulator:+ (under ${emulator[0]})}"
}

start=$(date +%s)
for arch in amd64 arm64; do
    stage "$arch"
    build "$AGENT_IMAGE" agent.Containerfile "$arch"
    build "$SHADOW_IMAGE" shadow.Containerfile "$arch"
done
for arch in amd64 arm64; do
    check "$AGENT_IMAGE" "$arch"
    check "$SHADOW_IMAGE" "$arch"
    # The agent image's router command is the entrypoint's binary.
    link=$(readlink "$work/check-$AGENT_IMAGE-$arch/rootfs/usr/sbin/router")
    [ "$link" = /usr/local/bin/kt-node-agent ] \
        || fail "$AGENT_IMAGE-$arch: /usr/sbin/router links to '$link'"
done
log "done in $(($(date +%s) - start)) s"

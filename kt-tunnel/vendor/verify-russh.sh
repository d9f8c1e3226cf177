#!/usr/bin/env bash
# Proves that kt-tunnel/vendor/russh is the russh package published on crates.io plus
# kt-tunnel/vendor/kt.patch, and nothing else (KT-PATCH.md says why kt carries a copy).
#
#   verify-russh.sh                check: fetch the published package with cargo, apply
#                                  kt.patch to a fresh copy, compare it with the vendored
#                                  copy; exit 1 naming every file that differs
#   verify-russh.sh --write-patch  re-vendoring: rewrite kt.patch as the diff between the
#                                  published package and the vendored copy, then check
#
# Needs cargo, rustc, patch, diff, tar and sha256sum, and crates.io (or a cargo cache that already
# holds the package). Writes only to a temporary directory (and cargo's own cache), builds
# nothing, so it leaves no build output in the vendored copy.
set -euo pipefail
export LC_ALL=C

russh_version=0.65.1
# sha256 of russh-0.65.1.crate as published (its checksum in the crates.io index). Cargo
# checks the download against the index; this pins the index entry as well.
russh_sha256=94be3d86c71b9ed220a675c405e35c7a02565a009bf8da2e9cc13a700320a5c5

here=$(cd "$(dirname "$0")" && pwd)
vendored=$here/russh
patch_file=$here/kt.patch
pristine_name=russh-$russh_version

mode=check
case "${1:-}" in
    "") ;;
    --write-patch) mode=write ;;
    *)
        echo "usage: $0 [--write-patch]" >&2
        exit 2
        ;;
esac

for tool in cargo rustc patch diff tar sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "verify-russh: $tool not found (patch: apt-get install patch)" >&2
        exit 2
    }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/kt-verify-russh.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The published package, fetched by cargo through a throwaway manifest outside the kt
# workspace (so kt's [patch.crates-io] does not apply to it).
mkdir -p "$work/fetch/src"
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "kt-russh-pristine"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
russh = { version = "=$russh_version", default-features = false }

[workspace]
EOF
: >"$work/fetch/src/lib.rs"
# Only the host's dependencies: fetching every platform's would download ~200 MB.
host=$(rustc -vV | sed -n 's/^host: //p')
(cd "$work/fetch" && cargo fetch --quiet --target "$host")

index_sha256=$(awk -v v="$russh_version" '
    $0 == "name = \"russh\"" { found = 1; next }
    found && $0 == "version = \"" v "\"" { version = 1; next }
    found && version && $1 == "checksum" { gsub(/"/, "", $3); print $3; exit }
    /^\[\[package\]\]/ { found = 0; version = 0 }
' "$work/fetch/Cargo.lock")
if [ "$index_sha256" != "$russh_sha256" ]; then
    echo "verify-russh: the crates.io index gives russh $russh_version checksum" \
        "'$index_sha256', this script pins $russh_sha256" >&2
    exit 1
fi

crate=
for candidate in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$pristine_name.crate"; do
    [ -f "$candidate" ] || continue
    if [ "$(sha256sum "$candidate" | cut -d' ' -f1)" = "$russh_sha256" ]; then
        crate=$candidate
        break
    fi
done
if [ -z "$crate" ]; then
    echo "verify-russh: no $pristine_name.crate with sha256 $russh_sha256 in cargo's cache" >&2
    exit 1
fi
tar -xzf "$crate" -C "$work"

# The vendored copy; a top-level target/ (build output, should someone build in there
# without CARGO_TARGET_DIR) is the only thing left out.
cp -a "$vendored" "$work/russh"
if [ -e "$work/russh/target" ]; then
    echo "verify-russh: ignoring build output $vendored/target (remove it)" >&2
    rm -rf "$work/russh/target"
fi

# `diff -ruN` from $work, so paths are relative (russh-0.65.1/... → russh/...); the
# timestamps diff puts on each file header are dropped so the patch is reproducible.
canonical_patch() {
    (cd "$work" && diff -ruN "$pristine_name" russh) | awk '
        /^diff -ruN / { print; header = 2; next }
        header > 0 && /^(---|\+\+\+) / { sub(/\t.*$/, ""); header--; print; next }
        { header = 0; print }
    ' || true
}

if [ "$mode" = write ]; then
    canonical_patch >"$patch_file"
    echo "verify-russh: wrote $patch_file ($(grep -c '^diff -ruN ' "$patch_file") files)" >&2
fi

# The published package with kt.patch applied, exactly (no fuzz).
cp -a "$work/$pristine_name" "$work/applied"
if ! (cd "$work/applied" && patch -p1 --fuzz=0 --quiet --force --no-backup-if-mismatch \
    --reject-file=- <"$patch_file" >"$work/patch.log" 2>&1); then
    echo "verify-russh: kt.patch does not apply to the published $pristine_name:" >&2
    cat "$work/patch.log" >&2
    exit 1
fi

if ! differences=$(cd "$work" && diff -rq applied russh); then
    echo "verify-russh: kt-tunnel/vendor/russh is not the published $pristine_name + kt.patch;" \
        "these files differ:" >&2
    printf '%s\n' "$differences" | sed -E \
        -e 's#^Files applied/(.*) and russh/.* differ$#  changed:   \1#' \
        -e 's#^Only in applied/?([^:]*): (.*)$#  missing:   \1/\2#' \
        -e 's#^Only in russh/?([^:]*): (.*)$#  extra:     \1/\2#' \
        -e 's#(missing|extra):   /#\1:   #' >&2
    echo "the differences (published + kt.patch → vendored):" >&2
    (cd "$work" && diff -ruN applied russh) | head -n 200 >&2 || true
    exit 1
fi

if ! canonical_patch | cmp -s - "$patch_file"; then
    echo "verify-russh: the copy matches, but kt.patch is not the canonical" \
        "'diff -ruN $pristine_name russh' (run $0 --write-patch)" >&2
    exit 1
fi

echo "verify-russh: kt-tunnel/vendor/russh is the published $pristine_name" \
    "+ kt.patch ($(grep -c '^diff -ruN ' "$patch_file") files)" >&2

#!/usr/bin/env bash
# Refuses to start `make test` on a disk that cannot hold what it writes, and says how much is
# missing: a disk that fills mid-build makes rustc stop with an internal error that names no
# cause, which reads like a broken commit.
#
# What a run writes, measured on a fresh clone (see docs/troubleshooting.md):
#   - the cargo target directory: about 7 GiB for lints, the fuzz check and every test binary
#     (with CARGO_INCREMENTAL=0, as `make test` sets it; 2.6 GiB more with incremental builds);
#   - the test cache, when `tests/env/setup.sh` has not filled it yet: about 4.5 GiB (the Go
#     module and build caches, kube-apiserver, etcd, the official plugin, moto, npm packages).
# Already-built parts count against the need, so a second run on the same clone passes with
# less free space. FLEET_ACCESS_SKIP_DISK_CHECK=1 skips the check.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/common.sh
. "$here/common.sh"

[[ "${FLEET_ACCESS_SKIP_DISK_CHECK:-}" == 1 ]] && exit 0

TARGET_MIB=7168
CACHE_MIB=4608
target="${CARGO_TARGET_DIR:-$(cd "$here/../.." && pwd)/target}"
mkdir -p "$target" "$FLEET_ACCESS_CACHE"
# Where they really are (a symbolic link to another disk is measured there).
target=$(realpath "$target")
cache=$(realpath "$FLEET_ACCESS_CACHE")

# What a folder holds, in MiB (0 when du cannot tell: files vanishing under a running build).
size_mib() {
    local size
    size=$( (du -sm "$1" 2>/dev/null || true) | cut -f1)
    echo "${size:-0}"
}
free_mib() { df -Pm "$1" | awk 'NR == 2 {print $4}'; }
device() { stat -c %d "$1"; }

# Each location's remaining need, on the filesystem it lives on.
declare -A need=() where=() on=()
add_need() { # path mib
    local dev
    dev=$(device "$1")
    need[$dev]=$(( ${need[$dev]:-0} + $2 ))
    where[$dev]="${where[$dev]:+${where[$dev]} and }$1"
    on[$dev]=$1
}
target_left=$(( TARGET_MIB - $(size_mib "$target") ))
(( target_left > 0 )) && add_need "$target" "$target_left"
if [[ ! -x "$KUBE_APISERVER_BIN" || ! -x "$ETCD_BIN" || ! -x "$SMP_BIN" || ! -x "$MOTO_SERVER_BIN" ]]; then
    cache_left=$(( CACHE_MIB - $(size_mib "$cache") ))
    (( cache_left > 0 )) && add_need "$cache" "$cache_left"
fi

short=0
for dev in ${need[@]+"${!need[@]}"}; do
    free=$(free_mib "${on[$dev]}")
    if (( free < need[$dev] )); then
        echo "make test: ${where[$dev]} need about $(( (need[$dev] + 1023) / 1024 )) GiB more, and the disk has $(( free / 1024 )) GiB free ($free MiB)." >&2
        short=1
    fi
done
if (( short )); then
    die "not enough disk space: free some (an old target/ of another checkout, /tmp), or point CARGO_TARGET_DIR or FLEET_ACCESS_CACHE at a larger disk; FLEET_ACCESS_SKIP_DISK_CHECK=1 runs anyway"
fi

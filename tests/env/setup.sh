#!/usr/bin/env bash
# Installs and builds everything the tests run, skipping what is already there
# (idempotent; a later run takes seconds):
#   - Debian packages: openssh-server, openssh-client, prometheus (with promtool),
#     openssl, python3-venv, ca-certificates;
#   - moto[server] from PyPI in a virtual environment in the cache;
#   - the IAM evaluator's npm packages (@cloud-copilot/iam-simulate, pinned by
#     tests/iam-evaluator/package-lock.json) in the cache;
#   - etcd, kube-apiserver, kubectl and the official session-manager-plugin, built
#     from the Go module proxy into the cache (needs Go >= 1.25 on PATH).
# Cache: ${FLEET_ACCESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleet-access}, keyed by version.
# Prints the locations at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/common.sh
. "$here/common.sh"

command -v go >/dev/null || die "Go is needed to build etcd, kube-apiserver and session-manager-plugin"
mkdir -p "$FLEET_ACCESS_CACHE"

"$here/install-packages.sh"

# pip is network-bound and the Go builds CPU-bound: run them side by side.
moto_log="$FLEET_ACCESS_CACHE/install-moto.log"
{ "$here/install-moto.sh" && "$here/install-iam-evaluator.sh"; } >"$moto_log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT INT TERM

"$here/build-kube.sh" etcd kube-apiserver kubectl
"$here/build-session-manager-plugin.sh"

if ! wait "$moto_pid"; then
    cat "$moto_log" >&2
    die "installing moto or the IAM evaluator failed"
fi
trap - EXIT INT TERM
cat "$moto_log" >&2

log "test environment ready:"
print_locations

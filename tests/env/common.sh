# shellcheck shell=bash
# Sourced by the tests/env scripts: pinned versions, cache layout and small helpers.
# Nothing here starts or builds anything.

# --- Pinned versions (change here only; the cache is keyed by them) ---------
# kube-apiserver: k8s.io/kubernetes from the Go module proxy. v1.35.x matches the
# k8s-openapi `v1_35` feature the workspace uses and builds with Go >= 1.25.
KUBE_VERSION="v1.35.4"
# etcd: the version k8s.io/kubernetes v1.35.4's go.mod requires.
ETCD_VERSION="v3.6.5"
# moto server from PyPI.
MOTO_VERSION="5.2.5"
# Official session-manager-plugin: a pseudo-version of a commit before release 1.2.889.0
# (later releases refuse stream URLs that are not AWS endpoints).
SMP_VERSION="v0.0.0-20241010233726-61cf1288c7c6"

# --- Cache layout --------------------------------------------------------------
# Outside the checkout so that a fresh clone (CI) reuses what earlier runs built.
FLEET_ACCESS_CACHE="${FLEET_ACCESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleet-access}"
KUBE_DIR="$FLEET_ACCESS_CACHE/kube-apiserver/$KUBE_VERSION"
ETCD_DIR="$FLEET_ACCESS_CACHE/etcd/$ETCD_VERSION"
SMP_DIR="$FLEET_ACCESS_CACHE/session-manager-plugin/$SMP_VERSION"
MOTO_DIR="$FLEET_ACCESS_CACHE/moto/$MOTO_VERSION"
# The IAM evaluator's npm packages, keyed by the lock file that pins them.
IAM_EVALUATOR_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/../iam-evaluator" && pwd)"
IAM_EVALUATOR_DIR="$FLEET_ACCESS_CACHE/iam-evaluator/$(sha256sum "$IAM_EVALUATOR_SRC/package-lock.json" | cut -c1-16)"
IAM_EVALUATOR_NODE_MODULES="$IAM_EVALUATOR_DIR/node_modules"
KUBE_APISERVER_BIN="$KUBE_DIR/bin/kube-apiserver"
KUBECTL_BIN="$KUBE_DIR/bin/kubectl"
ETCD_BIN="$ETCD_DIR/bin/etcd"
SMP_BIN="$SMP_DIR/bin/session-manager-plugin"
MOTO_SERVER_BIN="$MOTO_DIR/venv/bin/moto_server"

# Go: module and build caches live in the same cache folder; never fetch a toolchain.
export GOMODCACHE="$FLEET_ACCESS_CACHE/go/mod"
export GOCACHE="$FLEET_ACCESS_CACHE/go/build"
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Creates (or resets) a scratch Go module in $1 named $2.
new_consumer_module() {
    local dir="$1" name="$2"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && go mod init "$name" >/dev/null 2>&1)
}

# Prints the path of the go.mod of module@version from the module cache.
module_gomod() {
    go mod download -json "$1@$2" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p'
}

# Prints the resolved locations, one KEY=VALUE a line (read by the Rust fixtures).
print_locations() {
    cat <<LOCATIONS
FLEET_ACCESS_CACHE=$FLEET_ACCESS_CACHE
KUBE_VERSION=$KUBE_VERSION
ETCD_VERSION=$ETCD_VERSION
MOTO_VERSION=$MOTO_VERSION
SMP_VERSION=$SMP_VERSION
KUBE_APISERVER_BIN=$KUBE_APISERVER_BIN
KUBECTL_BIN=$KUBECTL_BIN
ETCD_BIN=$ETCD_BIN
SMP_BIN=$SMP_BIN
MOTO_SERVER_BIN=$MOTO_SERVER_BIN
IAM_EVALUATOR_NODE_MODULES=$IAM_EVALUATOR_NODE_MODULES
LOCATIONS
}

#!/usr/bin/env bash
# Builds kube-apiserver and etcd from the Go module proxy into the cache
# (see common.sh for versions and paths). Skips each binary that is already built.
# Usage: tests/env/build-kube.sh [kube-apiserver|etcd]...   (default: both)
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

build_kube_apiserver() {
    if [ -x "$KUBE_APISERVER_BIN" ]; then
        log "kube-apiserver $KUBE_VERSION already built: $KUBE_APISERVER_BIN"
        return
    fi
    local src="$KUBE_DIR/src" minor staging
    log "building kube-apiserver $KUBE_VERSION (first time: 10-20 min on 2 cores)"
    new_consumer_module "$src" fleet-access.local/kube-apiserver-build
    cd "$src"
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
    # local folders; a consumer must replace each with its published tag (v0.X.Y).
    staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' \
        "$(module_gomod k8s.io/kubernetes "$KUBE_VERSION")")
    [ -n "$staging" ] || die "no staging modules found in k8s.io/kubernetes $KUBE_VERSION go.mod"
    for m in $staging; do
        go mod edit -replace="$m=$m@v0.${KUBE_VERSION#v1.}"
    done
    go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION"
    go mod tidy
    minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
    mkdir -p "$KUBE_DIR/bin"
    go build -trimpath -ldflags "-s -w \
        -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 \
        -X k8s.io/component-base/version.gitMinor=$minor \
        -X k8s.io/component-base/version.gitTreeState=clean" \
        -o "$KUBE_APISERVER_BIN.tmp" k8s.io/kubernetes/cmd/kube-apiserver
    mv "$KUBE_APISERVER_BIN.tmp" "$KUBE_APISERVER_BIN"
    log "built $KUBE_APISERVER_BIN"
}

build_etcd() {
    if [ -x "$ETCD_BIN" ]; then
        log "etcd $ETCD_VERSION already built: $ETCD_BIN"
        return
    fi
    local src="$ETCD_DIR/src"
    log "building etcd $ETCD_VERSION"
    new_consumer_module "$src" fleet-access.local/etcd-build
    cd "$src"
    go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go mod tidy
    mkdir -p "$ETCD_DIR/bin"
    go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN.tmp" go.etcd.io/etcd/server/v3
    mv "$ETCD_BIN.tmp" "$ETCD_BIN"
    log "built $ETCD_BIN"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kube-apiserver)
for t in "${targets[@]}"; do
    case "$t" in
        kube-apiserver) (build_kube_apiserver) ;;
        etcd) (build_etcd) ;;
        *) die "unknown target $t (kube-apiserver|etcd)" ;;
    esac
done

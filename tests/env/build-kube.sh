#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from the Go module proxy into the cache
# (see common.sh for versions and paths). Skips each binary that is already built.
# Usage: tests/env/build-kube.sh [etcd|kube-apiserver|kubectl]...   (default: all three)
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

KUBE_SRC="$KUBE_DIR/src"

# A scratch module that requires k8s.io/kubernetes and replaces each of its staging
# modules (required at v0.0.0, replaced by local folders upstream) with its
# published tag v0.X.Y. Reused when it exists.
prepare_kube_module() {
    if [ -e "$KUBE_SRC/.prepared" ]; then
        return
    fi
    local staging
    new_consumer_module "$KUBE_SRC" fleet-access.local/kube-build
    cd "$KUBE_SRC"
    staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' \
        "$(module_gomod k8s.io/kubernetes "$KUBE_VERSION")")
    [ -n "$staging" ] || die "no staging modules found in k8s.io/kubernetes $KUBE_VERSION go.mod"
    for m in $staging; do
        go mod edit -replace="$m=$m@v0.${KUBE_VERSION#v1.}"
    done
    touch .prepared
}

# build_kube_program NAME PACKAGE OUTPUT
build_kube_program() {
    local name="$1" pkg="$2" out="$3" minor
    if [ -x "$out" ]; then
        log "$name $KUBE_VERSION already built: $out"
        return
    fi
    log "building $name $KUBE_VERSION"
    prepare_kube_module
    cd "$KUBE_SRC"
    go get -tool "$pkg@$KUBE_VERSION"
    go mod tidy
    minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
    mkdir -p "$(dirname "$out")"
    go build -trimpath -ldflags "-s -w \
        -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 \
        -X k8s.io/component-base/version.gitMinor=$minor \
        -X k8s.io/component-base/version.gitTreeState=clean" \
        -o "$out.tmp" "$pkg"
    mv "$out.tmp" "$out"
    log "built $out"
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
[ ${#targets[@]} -gt 0 ] || targets=(etcd kube-apiserver kubectl)
for t in "${targets[@]}"; do
    case "$t" in
        etcd) (build_etcd) ;;
        kube-apiserver) (build_kube_program kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$KUBE_APISERVER_BIN") ;;
        kubectl) (build_kube_program kubectl k8s.io/kubernetes/cmd/kubectl "$KUBECTL_BIN") ;;
        *) die "unknown target $t (etcd|kube-apiserver|kubectl)" ;;
    esac
done

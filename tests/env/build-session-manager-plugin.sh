#!/usr/bin/env bash
# Builds the official session-manager-plugin from the Go module proxy into the cache
# (see common.sh for the pinned pseudo-version). Skips the build when the binary exists.
# The plugin has no go.mod, so the consumer module below pins its dependencies
# (the versions its own vendor folder carried at that commit).
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

if [ -x "$SMP_BIN" ]; then
    log "session-manager-plugin $SMP_VERSION already built: $SMP_BIN"
    exit 0
fi

log "building session-manager-plugin $SMP_VERSION"
src="$SMP_DIR/src"
new_consumer_module "$src" fleet-access.local/session-manager-plugin-build
cd "$src"
pins=(
    "github.com/aws/session-manager-plugin@$SMP_VERSION"
    "github.com/aws/aws-sdk-go@v1.54.10"
    "github.com/jmespath/go-jmespath@v0.4.0"
    # Must stay at this old commit: the plugin uses its pre-1.0 API.
    "github.com/twinj/uuid@v0.0.0-20151029044442-89173bcdda19"
    "github.com/xtaci/smux@v1.5.16"
    "github.com/gorilla/websocket@v1.5.1"
    "github.com/cihub/seelog@v0.0.0-20170130134532-f561c5e57575"
    "github.com/eiannone/keyboard@v0.0.0-20220611211555-0d226195f203"
    "github.com/fsnotify/fsnotify@v1.7.0"
    "golang.org/x/crypto@v0.31.0"
    "golang.org/x/sync@v0.10.0"
    "golang.org/x/sys@v0.28.0"
    "golang.org/x/term@v0.27.0"
    # Only imported by its tests, pinned so that `go mod tidy` resolves nothing by itself.
    "github.com/stretchr/testify@v1.9.0"
)
for p in "${pins[@]}"; do
    go mod edit -require="$p"
done
main_pkg=github.com/aws/session-manager-plugin/src/sessionmanagerplugin-main
go mod edit -tool="$main_pkg"
go mod tidy
mkdir -p "$SMP_DIR/bin"
go build -trimpath -ldflags "-s -w" -o "$SMP_BIN.tmp" "$main_pkg"
mv "$SMP_BIN.tmp" "$SMP_BIN"
log "built $SMP_BIN"

#!/usr/bin/env bash
# Creates the moto server virtual environment in the cache (pinned version, PyPI).
# Skips it when the venv of that version is complete.
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

if [ -x "$MOTO_SERVER_BIN" ] && [ -e "$MOTO_DIR/.complete" ]; then
    log "moto $MOTO_VERSION already installed: $MOTO_SERVER_BIN"
    exit 0
fi
# Debian's python3 (with python3-venv) is preferred; any python3 with venv works.
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
log "installing moto[server]==$MOTO_VERSION into $MOTO_DIR/venv"
rm -rf "$MOTO_DIR"
mkdir -p "$MOTO_DIR"
"$python" -m venv "$MOTO_DIR/venv"
"$MOTO_DIR/venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
"$MOTO_SERVER_BIN" --help >/dev/null
touch "$MOTO_DIR/.complete"
log "installed $MOTO_SERVER_BIN"

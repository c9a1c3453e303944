#!/usr/bin/env bash
# Installs the IAM evaluator's npm packages (tests/iam-evaluator/package-lock.json, exactly)
# into the cache. Skips it when that lock file's install is complete.
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

if [ -e "$IAM_EVALUATOR_DIR/.complete" ]; then
    log "IAM evaluator already installed: $IAM_EVALUATOR_NODE_MODULES"
    exit 0
fi
command -v npm >/dev/null || die "npm is needed for the IAM evaluator (install-packages.sh installs it)"
log "installing the IAM evaluator's packages into $IAM_EVALUATOR_DIR"
rm -rf "$IAM_EVALUATOR_DIR"
mkdir -p "$IAM_EVALUATOR_DIR"
cp "$IAM_EVALUATOR_SRC/package.json" "$IAM_EVALUATOR_SRC/package-lock.json" "$IAM_EVALUATOR_DIR/"
(cd "$IAM_EVALUATOR_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
touch "$IAM_EVALUATOR_DIR/.complete"
log "installed $IAM_EVALUATOR_NODE_MODULES"

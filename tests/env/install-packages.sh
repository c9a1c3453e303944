#!/usr/bin/env bash
# Installs the Debian packages the tests need, only those that are missing.
# Services that the packages would start (sshd on :22, prometheus on :9090) are kept
# from starting: the tests start their own, on loopback, with their own config.
set -euo pipefail
# shellcheck source=tests/env/common.sh
. "$(dirname "$0")/common.sh"

# openssh-server: sshd; openssh-client: ssh, scp, ssh-keygen; prometheus: prometheus
# and promtool; python3-venv: Debian's python3 with venv for moto; tmux: the real terminal the
# shell sessions' tests type into (util-linux's `script`, which the SSM emulator runs as the agent
# does, is essential on Debian).
wanted=(openssh-server openssh-client prometheus openssl python3-venv ca-certificates tmux)
missing=()
for pkg in "${wanted[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
# Node.js and npm run the IAM evaluator (tests/iam-evaluator); any install on PATH will do.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    wanted+=(nodejs npm)
    missing+=(nodejs npm)
fi
if [ ${#missing[@]} -eq 0 ]; then
    log "Debian packages present: ${wanted[*]}"
    exit 0
fi

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
log "installing Debian packages: ${missing[*]}"
# Keep package scripts from starting the services (standard Debian policy-rc.d hook);
# a policy file already in place is left as it is.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    trap '"${sudo_cmd[@]}" rm -f "$policy"' EXIT
fi
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

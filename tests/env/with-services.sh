#!/usr/bin/env bash
# with-services.sh CMD [ARGS...]
#
# Starts the services every test binary shares, once: etcd + kube-apiserver and moto,
# on free loopback ports. Runs CMD with
#   FLEET_ACCESS_KUBECONFIG, KUBECONFIG  the admin kubeconfig of the control plane
#   FLEET_ACCESS_MOTO_ENDPOINT           http://127.0.0.1:<port> of moto
# and stops the services when CMD ends, on Ctrl-C or TERM (and, through
# supervise.sh, even when this wrapper is killed). Exits with CMD's status.
# Example: tests/env/with-services.sh cargo test --workspace
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec cargo run --quiet --manifest-path "$root/Cargo.toml" \
    -p fleet-access-tests --bin fleet-access-test-services -- "$@"

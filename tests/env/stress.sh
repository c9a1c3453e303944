#!/usr/bin/env bash
# stress.sh: runs the end-to-end test binaries RUNS times in a row while the machine is loaded,
# and reports every failure with its test name. A flaky test shows up here long before it
# fails a CI run.
#
#   RUNS=20        how many rounds (each round runs every binary once)
#   LIMIT=4800     seconds for the whole run; a round that would start later is not started
#   TESTS="..."    the test binaries, as PACKAGE:TARGET (default: the data path end to end)
#   LOAD=build     a release build of the workspace, over and over, in a scratch target
#                  folder (LOAD=none for an idle machine)
#
# Runs under with-services.sh (one kube-apiserver + etcd and one moto for the whole run), like
# `make test`. Prints one line per failure, then "N passed, M failed" counting binary runs, and
# exits non-zero when any failed. The full output of each failed run is kept in the folder it
# names; when none failed, the folder goes.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

runs=${RUNS:-20}
limit=${LIMIT:-4800}
load=${LOAD:-build}
tests=${TESTS:-"fleet-access-tests:bridge_e2e fleet-access-tests:client_faults fleet-access-tests:full_stack fleet-access-ssm-emulator:sessions fleet-access-ssm-emulator:violations fleet-access-ssm-emulator:official_plugin fleet-access-agent-bridge:driver fleet-access-tests:shell_sessions fleet-access-ssm-emulator:shell_documents fleet-access-operator:shell_audit"}

if [[ -z "${FLEET_ACCESS_KUBECONFIG:-}" ]]; then
    exec bash tests/env/with-services.sh bash "$0" "$@"
fi

logs=$(mktemp -d "${TMPDIR:-/tmp}/fleet-access-stress.XXXXXX")
started=$(date +%s)

# Build every binary first, so that the rounds measure tests, not compilation.
for test in $tests; do
    cargo test --quiet -p "${test%%:*}" --test "${test#*:}" --no-run 2>"$logs/build.log" \
        || { cat "$logs/build.log"; exit 1; }
done

load_pid=
stop_load() {
    if [[ -n "$load_pid" ]]; then
        kill -- "-$load_pid" 2>/dev/null || true
        wait "$load_pid" 2>/dev/null || true
    fi
}
trap stop_load EXIT
if [[ "$load" == build ]]; then
    # Its own process group, so that stopping it stops cargo and every rustc under it.
    set -m
    (
        while true; do
            cargo build --quiet --release --workspace --target-dir "$logs/load-target" \
                >/dev/null 2>&1 || true
            cargo clean --quiet --release --target-dir "$logs/load-target" \
                -p fleet-access-agent-bridge -p fleet-access-operator -p fleet-access-tests \
                >/dev/null 2>&1 || true
        done
    ) &
    load_pid=$!
    set +m
fi

passed=0
failed=0
round=0
while ((round < runs)); do
    if (($(date +%s) - started >= limit)); then
        echo "stress: time limit of ${limit} s reached after $round rounds"
        break
    fi
    round=$((round + 1))
    for test in $tests; do
        log="$logs/round-$round-${test#*:}.log"
        if cargo test --quiet -p "${test%%:*}" --test "${test#*:}" >"$log" 2>&1; then
            passed=$((passed + 1))
            rm -f "$log"
        else
            failed=$((failed + 1))
            names=$(sed -nE 's/^---- (.*) stdout ----$/\1/p' "$log" | paste -sd, - || true)
            echo "stress: round $round: ${test#*:} failed: ${names:-no test named (see the log)}; log: $log"
        fi
    done
    echo "stress: round $round done after $(($(date +%s) - started)) s ($failed failed so far)"
done

echo "stress: $round rounds of: $tests"
echo "stress: $passed passed, $failed failed"
stop_load
if ((failed == 0)); then
    # Nothing to keep: the folder held only the build log and the load's target.
    rm -rf "$logs"
fi
((failed == 0))

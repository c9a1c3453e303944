#!/usr/bin/env bash
# supervise.sh WATCH_PID CMD [ARGS...]
#
# Runs CMD and makes sure it does not outlive WATCH_PID (the test process that
# started it): when WATCH_PID is gone, when this script gets TERM/INT/HUP, or when
# CMD exits, the whole process group of this script (CMD and anything it forked) is
# stopped (TERM, then KILL after 5 s). Exits with CMD's status when CMD ends first.
# When SUPERVISE_REMOVE_DIR is set, that folder is removed once CMD has stopped
# (for services kept in statics, whose temporary folders Rust never drops).
# Start it as the leader of its own process group (the Rust fixtures do).
set -u
watch_pid=$1
shift

"$@" &
child=$!

remove_dir() {
    if [ -n "${SUPERVISE_REMOVE_DIR:-}" ]; then
        rm -rf -- "$SUPERVISE_REMOVE_DIR"
    fi
}

stop_group() {
    trap '' TERM INT HUP
    kill -TERM 0 2>/dev/null
    for _ in $(seq 50); do
        if ! kill -0 "$child" 2>/dev/null; then
            remove_dir
            exit "$1"
        fi
        sleep 0.1
    done
    remove_dir
    kill -KILL 0
}
trap 'stop_group 143' TERM INT HUP

# bash reaps the child as soon as it exits, so `kill -0` fails from then on.
while kill -0 "$child" 2>/dev/null; do
    if ! kill -0 "$watch_pid" 2>/dev/null; then
        stop_group 0
    fi
    sleep 0.5
done
wait "$child"
status=$?
remove_dir
exit "$status"

#!/bin/bash
# Teardown for rexecpf CI: removes test containers (label rexecpf.test=1),
# stops the dockerd started by system-setup.sh (identified by its PID file
# /run/rexecpf-ci-dockerd.pid; a dockerd we did not start is left running),
# and removes a second engine the tests left behind.
# Never fails: teardown problems are reported but exit status is 0.
set -uo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

DOCKERD_PIDFILE=/run/rexecpf-ci-dockerd.pid

log() { printf '[system-teardown %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if timeout 10 docker info >/dev/null 2>&1; then
    ids="$(timeout 30 docker ps -aq --filter label=rexecpf.test=1 2>/dev/null || true)"
    if [ -n "$ids" ]; then
        log "removing test containers: $(echo $ids)"
        # shellcheck disable=SC2086
        timeout 120 docker rm -f $ids >/dev/null || log "WARNING: docker rm failed"
    else
        log "no test containers to remove"
    fi
else
    log "docker engine not answering; skipping container cleanup"
fi

if [ -s "$DOCKERD_PIDFILE" ]; then
    pid="$(cat "$DOCKERD_PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "dockerd still alive after 30s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
        fi
        kill -0 "$pid" 2>/dev/null && log "WARNING: dockerd $pid survived" || log "dockerd stopped"
    else
        log "dockerd pid $pid not running"
    fi
    rm -f "$DOCKERD_PIDFILE"
else
    log "no $DOCKERD_PIDFILE; not stopping any dockerd"
fi

# The second engine of tests/functional/second_engine.py is torn down by the
# test process at exit; one left behind (the process was killed) is removed
# here: its containers, its dockerd (pidfile under its root), the processes
# of its containers (live restore keeps them), its mounts, its bridge.
ENGINE2_ROOT="${REXECPF_TEST_DOCKERD2_ROOT:-/tmp/rexecpf-dockerd2}"
ENGINE2_BRIDGE="${REXECPF_TEST_DOCKERD2_BRIDGE:-rexecpf-br2}"
if [ -d "$ENGINE2_ROOT" ]; then
    log "removing the tests' second Docker engine ($ENGINE2_ROOT)"
    engine2="docker -H unix://$ENGINE2_ROOT/docker.sock"
    if timeout 10 $engine2 info >/dev/null 2>&1; then
        timeout 60 $engine2 ps -aq | xargs -r timeout 120 $engine2 rm -f >/dev/null 2>&1 ||
            log "WARNING: could not remove the second engine's containers"
    fi
    pid="$(cat "$ENGINE2_ROOT/docker.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for proc in /proc/[0-9]*; do
        if grep -qF "$ENGINE2_ROOT" "$proc/cmdline" 2>/dev/null; then
            kill -KILL "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    awk -v root="$ENGINE2_ROOT/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mountpoint; do umount -l "$mountpoint" 2>/dev/null || true; done
    rm -rf "$ENGINE2_ROOT" || log "WARNING: could not remove $ENGINE2_ROOT"
fi
if ip link show "$ENGINE2_BRIDGE" >/dev/null 2>&1; then
    ip link delete "$ENGINE2_BRIDGE" || log "WARNING: could not delete the bridge $ENGINE2_BRIDGE"
fi
exit 0

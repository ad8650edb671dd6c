#!/bin/bash
# Teardown for rexecpf CI: removes test containers (label rexecpf.test=1) and
# stops the dockerd started by system-setup.sh (identified by its PID file
# /run/rexecpf-ci-dockerd.pid; a dockerd we did not start is left running).
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
exit 0

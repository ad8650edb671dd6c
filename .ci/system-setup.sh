#!/bin/bash
# System setup for rexecpf CI.  Idempotent; run as root.
#
#  1. installs the Debian packages the tests need (retrying apt once);
#  2. starts a Docker engine in the background unless one already answers;
#  3. builds the offline test image rexecpf-busybox:latest from busybox-static
#     (no registry access is available, so nothing is ever pulled);
#  4. checks that a container gets an IP on the default bridge and that the
#     host can reach a TCP server inside it at that IP.
#
# Networking notes (verified on Debian 12 / docker.io 20.10, in a VM whose
# net.ipv4.ip_forward is 0 and where we must not touch the host firewall):
#   dockerd is started with --iptables=false --ip-forward=false --ip-masq=false.
#   Docker still creates the default bridge docker0 (172.17.0.1/16) and gives
#   each container a veth on it, so host -> container traffic to the
#   container's IP is plain L2 on docker0: no NAT, no forwarding and no
#   iptables rules are needed.  Published ports (-p) are NOT used by the tests
#   (and would rely on the userland proxy only).  Containers cannot reach the
#   outside world (no masquerading), which is fine: the tests only talk
#   host <-> container.  `docker run` prints "WARNING: IPv4 forwarding is
#   disabled. Networking will not work." -- harmless for host<->container.
#   If docker0 is ever found DOWN, we bring it up with
#   `ip link set docker0 up` (it comes up by itself once a container attaches).
#
# Environment knobs:
#   REXECPF_CI_SKIP_APT=1   skip the apt-get step (packages already present)
#   DOCKERD_LOG             dockerd log file (default /tmp/dockerd.log)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export NEEDRESTART_SUSPEND=1  # keep needrestart quiet on hosts that have it
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
DOCKERD_PIDFILE=/run/rexecpf-ci-dockerd.pid
IMAGE=rexecpf-busybox:latest

log() { printf '[system-setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*"; exit 1; }

if [ "$(id -u)" != 0 ]; then
    die "must run as root"
fi

# ---------------------------------------------------------------- packages
# (iproute2: tests/functional/second_engine.py makes the bridge of a second
# dockerd with `ip link`; that engine is started and removed by the tests.)
PACKAGES=(
    docker.io busybox-static chromium openssh-server openssh-client
    postgresql nginx wrk curl openssl systemd iproute2 procps ca-certificates
)

apt_install() {
    apt-get update -q &&
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

if [ "${REXECPF_CI_SKIP_APT:-0}" = 1 ]; then
    log "skipping apt (REXECPF_CI_SKIP_APT=1)"
else
    log "installing packages: ${PACKAGES[*]}"
    if ! apt_install; then
        log "apt failed; retrying once in 10s"
        sleep 10
        apt_install || die "apt-get install failed twice"
    fi
    log "packages installed"
fi

# Installing nginx/postgresql/openssh-server on a systemd-less machine may or
# may not start their default instances (policy-rc.d).  The tests start their
# own private instances on free loopback ports, so the default ones are
# irrelevant; we leave them alone.

# sshd privilege separation directory (normally created by systemd).
mkdir -p /run/sshd
chmod 0755 /run/sshd

# ---------------------------------------------------------------- dockerd
docker_ok() { timeout 10 docker info >/dev/null 2>&1; }

if docker_ok; then
    log "docker engine already answering; not starting dockerd"
else
    if [ -s "$DOCKERD_PIDFILE" ] && kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null; then
        log "dockerd (pid $(cat "$DOCKERD_PIDFILE")) running but not answering yet"
    else
        # dockerd refuses to start when a stale pidfile of its own exists.
        rm -f /var/run/docker.pid
        log "starting dockerd (log: $DOCKERD_LOG)"
        # setsid + nohup: fully detached from the caller's session, so it
        # survives the end of this script and of the CI step.
        setsid nohup dockerd --iptables=false --ip-forward=false --ip-masq=false \
            >>"$DOCKERD_LOG" 2>&1 </dev/null &
        echo $! >"$DOCKERD_PIDFILE"
        log "dockerd pid $(cat "$DOCKERD_PIDFILE")"
    fi
    for i in $(seq 1 60); do
        if docker_ok; then
            break
        fi
        if ! kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null; then
            tail -n 50 "$DOCKERD_LOG" || true
            die "dockerd exited during startup"
        fi
        sleep 1
    done
    if ! docker_ok; then
        tail -n 50 "$DOCKERD_LOG" || true
        die "docker info did not answer within 60s"
    fi
    log "docker engine is up"
fi
docker version --format 'docker client {{.Client.Version}}, server {{.Server.Version}}' || true

# ---------------------------------------------------------------- image
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ] || die "busybox not found"
if ! file_out="$(LC_ALL=C file -L "$BUSYBOX" 2>/dev/null)"; then file_out=""; fi
case "$file_out" in
    *dynamically*) die "$BUSYBOX is dynamically linked; need busybox-static" ;;
esac

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "image $IMAGE already present"
else
    log "building $IMAGE offline from $BUSYBOX"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    root="$work/rootfs"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var/www,www}
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    chmod 0755 "$root/bin/busybox"
    # `busybox --list-full` gives paths like usr/bin/wget; fall back to
    # `--list` (names only, all linked into /bin).
    if "$BUSYBOX" --list-full >/dev/null 2>&1; then
        "$BUSYBOX" --list-full | while read -r applet; do
            [ "$applet" = bin/busybox ] && continue
            mkdir -p "$root/$(dirname "$applet")"
            ln -sf /bin/busybox "$root/$applet"
        done
    else
        "$BUSYBOX" --list | while read -r applet; do
            [ "$applet" = busybox ] && continue
            ln -sf /bin/busybox "$root/bin/$applet"
        done
    fi
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    echo 'rexecpf busybox test image' >"$root/www/index.html"
    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh"]' \
        --change 'LABEL rexecpf.test-image=1' \
        "$work/rootfs.tar" "$IMAGE" >/dev/null
    rm -rf "$work"
    trap - EXIT
    log "image $IMAGE built"
fi

# ---------------------------------------------------------------- checks
out="$(timeout 60 docker run --rm --init --label rexecpf.test=1 "$IMAGE" /bin/busybox echo ok)"
[ "$out" = ok ] || die "container smoke test printed '$out' instead of 'ok'"
log "container smoke test ok"

log "checking host -> container reachability"
cid="$(timeout 60 docker run -d --init --label rexecpf.test=1 "$IMAGE" \
    sh -c 'echo reach-ok >/www/probe.txt && exec httpd -f -p 8000 -h /www')"
cleanup_probe() { docker rm -f "$cid" >/dev/null 2>&1 || true; }
trap cleanup_probe EXIT
ip=""
for i in $(seq 1 20); do
    ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid" 2>/dev/null || true)"
    [ -n "$ip" ] && break
    sleep 0.5
done
[ -n "$ip" ] || die "probe container got no IP address"
log "probe container ip $ip"
if ip link show docker0 >/dev/null 2>&1 && ! ip link show docker0 | grep -q 'state UP\|,UP'; then
    log "docker0 is down; bringing it up"
    ip link set docker0 up || true
fi
body=""
for i in $(seq 1 20); do
    body="$(curl -fsS --max-time 2 "http://$ip:8000/probe.txt" 2>/dev/null || true)"
    [ "$body" = reach-ok ] && break
    sleep 0.5
done
if [ "$body" != reach-ok ]; then
    ip addr show docker0 || true
    ip route || true
    docker logs "$cid" || true
    die "container httpd at $ip:8000 not reachable from host"
fi
cleanup_probe
trap - EXIT
log "host reaches container IPs directly over docker0: ok"
log "done"

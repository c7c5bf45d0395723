#!/usr/bin/env bash
# The shipped system units under a real systemd (Debian 12's systemd 252 as PID 1 of a container):
# installs vist2d, vist2ctl and the default model as the README says, enables vist2d.socket, and
# checks what a user relies on:
#   - a member of group vist2 connects and the service starts by socket activation (Type=notify:
#     active only once READY=1 came, with its STATUS= text); a non-member is refused;
#   - `systemctl restart vist2d` and `systemctl stop vist2d` leave the socket usable;
#   - the watchdog receives keep-alives (WatchdogSec shortened by a drop-in so this takes seconds);
#   - `systemctl kill -s KILL vist2d` is followed by a restart that serves again with its cache
#     intact (the document compressed before the kill is read back from the prefix cache) and no
#     temporary files left behind.
# Needs root, debootstrap and systemd-container (installed if missing), a release build
# (.build/release/vist2d, vist2ctl) and the default model (scripts/fetch-model.sh). The container's
# tree (~300 MB, ~40 s to build) is kept in $VIST2_SYSTEMD_ROOT (default
# /var/cache/vist2-systemd-test/bookworm) and booted with a volatile overlay, so it stays pristine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
ROOT="${VIST2_SYSTEMD_ROOT:-/var/cache/vist2-systemd-test/bookworm}"
MODELS="${VIST2_MODELS:-${XDG_DATA_HOME:-$HOME/.local/share}/vist2/models}"
[[ "$(id -u)" == 0 ]] || { echo "systemd-test: needs root (debootstrap, systemd-nspawn)" >&2; exit 1; }
[[ -x .build/release/vist2d && -x .build/release/vist2ctl ]] || { echo "systemd-test: build first (swift build -c release)" >&2; exit 1; }
[[ -d "$MODELS/vist2-smollm2-135m" ]] || { echo "systemd-test: no default model in $MODELS (scripts/fetch-model.sh)" >&2; exit 1; }
if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container
fi

if [[ ! -x "$ROOT/usr/lib/systemd/systemd" ]]; then
    echo "systemd-test: building the container tree in $ROOT"
    rm -rf "$ROOT.tmp" && mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,libopenblas0-pthread,libfreetype6,libpng16-16,fonts-dejavu-core,libstdc++6 \
        bookworm "$ROOT.tmp" http://deb.debian.org/debian >/dev/null
    rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
fi

# The container runs in a cgroup of its own in every hierarchy this host has (it may be a v1/v2
# hybrid), removed afterwards with whatever nspawn and the container's systemd created in it.
CG="vist2-systemd-test-$$"
cgroups=()
for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [[ -w "$h" && -e "$h/cgroup.procs" ]] || continue
    mkdir -p "$h$CG" 2>/dev/null && cgroups+=("$h$CG")
done
NSPAWN=""
LOG="$(mktemp)"
cleanup() {
    set +e
    if [[ -n "$NSPAWN" ]]; then
        kill "$NSPAWN" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$NSPAWN" 2>/dev/null
    fi
    for cg in "${cgroups[@]}"; do
        for p in $(cat "$cg"/cgroup.procs 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        sleep 0.2
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    rm -f "$LOG"
}
trap cleanup EXIT

(
    for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs" 2>/dev/null || true; done
    exec systemd-nspawn -D "$ROOT" --volatile=overlay --boot --register=no --keep-unit --console=passive \
        --bind-ro="$REPO/.build/release:/mnt/build" --bind-ro="$REPO/systemd:/mnt/units" --bind-ro="$MODELS:/mnt/models" \
        --bind-ro=/opt/swift/usr/lib/swift/linux
) >"$LOG" 2>&1 &
NSPAWN=$!

# The container's PID 1 is nspawn's child; wait until its systemd has finished booting.
C=""
for _ in $(seq 300); do
    C="$(pgrep -P "$NSPAWN" | head -1 || true)"
    if [[ -n "$C" ]] && state="$(nsenter -t "$C" -a systemctl is-system-running 2>/dev/null)"; then break; fi
    [[ "${state:-}" == "degraded" ]] && break
    kill -0 "$NSPAWN" 2>/dev/null || { cat "$LOG"; echo "systemd-test: the container did not boot" >&2; exit 1; }
    sleep 0.1
done
ctr() { nsenter -t "$C" -a "$@"; }
echo "systemd-test: booted $(ctr systemctl --version | head -1) ($(ctr systemctl is-system-running || true))"

fail() {
    echo "systemd-test: FAILED: $*" >&2
    ctr journalctl -u vist2d.service -u vist2d.socket --no-pager -n 60 >&2 || true
    exit 1
}
ok() { echo "systemd-test: ok: $*"; }

# Install as the README says: binaries in /usr/local/bin, a system user vist2 whose group may use
# the daemon, the model store in /var/lib/vist2/models, the units in /etc/systemd/system.
ctr bash -c '
set -e
install -m 0755 /mnt/build/vist2d /mnt/build/vist2ctl /usr/local/bin/
useradd --system --home-dir /var/lib/vist2 --shell /usr/sbin/nologin vist2
useradd --create-home --groups vist2 alice
useradd --create-home bob
install -d -o vist2 -g vist2 /var/lib/vist2 /var/lib/vist2/models
cp -r /mnt/models/. /var/lib/vist2/models/ && chown -R vist2:vist2 /var/lib/vist2/models
cp /mnt/units/vist2d.service /mnt/units/vist2d.socket /etc/systemd/system/
# Only to observe keep-alives within seconds; everything else is the shipped unit.
mkdir -p /etc/systemd/system/vist2d.service.d
printf "[Service]\nWatchdogSec=4\n" >/etc/systemd/system/vist2d.service.d/test-watchdog.conf
head -c 6000 /usr/share/common-licenses/GPL-3 >/home/alice/doc.txt && chown alice /home/alice/doc.txt
systemctl daemon-reload
systemctl enable --now vist2d.socket
' >/dev/null 2>&1 || fail "installing"

SOCK=/run/vist2/vist2.sock
# Every client call is bounded: a daemon that never answers fails the test instead of hanging it.
as_alice() { ctr timeout 120 runuser -u alice -- /usr/local/bin/vist2ctl "$@" --socket "$SOCK"; }
[[ "$(ctr systemctl is-active vist2d.socket)" == active ]] || fail "vist2d.socket is not active"
[[ "$(ctr systemctl is-active vist2d.service || true)" != active ]] || fail "vist2d started before anyone connected"
[[ "$(ctr stat -c '%a %U %G' /run/vist2)" == "755 root root" ]] || fail "/run/vist2 is $(ctr stat -c '%a %U %G' /run/vist2)"
[[ "$(ctr stat -c '%a %U %G' $SOCK)" == "660 root vist2" ]] || fail "the socket is $(ctr stat -c '%a %U %G' $SOCK)"

# 1. Activation by a member of group vist2; readiness.
as_alice status --json | grep -q '"state" *: *"ready"' || fail "alice (group vist2) was not served"
[[ "$(ctr systemctl is-active vist2d.service)" == active ]] || fail "vist2d did not start by activation"
ctr systemctl show -p StatusText --value vist2d.service | grep -q "^serving" || fail "no READY/STATUS from vist2d"
ctr systemctl show -p Type --value vist2d.service | grep -qx notify || fail "not Type=notify"
ok "group member served by socket activation; Type=notify ready with status '$(ctr systemctl show -p StatusText --value vist2d.service)'"

# 2. A non-member is refused by the socket's mode.
if out="$(ctr timeout 120 runuser -u bob -- /usr/local/bin/vist2ctl status --socket $SOCK 2>&1)"; then fail "bob (not in group vist2) was served"; fi
grep -qi "permission denied" <<<"$out" || fail "bob's refusal does not say why: $out"
ok "non-member refused: $(head -1 <<<"$out")"

# 3. Compress a document; restart and stop leave the socket usable.
first="$(as_alice compress --json /home/alice/doc.txt)" || fail "compress"
chunks="$(grep -o '"chunks" *: *[0-9]*' <<<"$first" | grep -o '[0-9]*$')"
((chunks >= 2)) || fail "the document made $chunks chunks: $first"
ctr systemctl restart vist2d.service
as_alice status >/dev/null || fail "the socket is unusable after systemctl restart"
ctr systemctl stop vist2d.service
[[ "$(ctr systemctl is-active vist2d.socket)" == active ]] || fail "stopping the service stopped the socket"
ctr test -S $SOCK || fail "stopping the service removed the socket"
as_alice status >/dev/null || fail "the socket is unusable after systemctl stop"
ok "restart and stop leave the socket usable"

# 4. The watchdog gets keep-alives.
w1="$(ctr systemctl show -p WatchdogTimestampMonotonic --value vist2d.service)"
sleep 3
w2="$(ctr systemctl show -p WatchdogTimestampMonotonic --value vist2d.service)"
[[ -n "$w2" && "$w2" != 0 && "$w2" != "$w1" ]] || fail "no watchdog keep-alives ($w1 -> $w2)"
ok "watchdog keep-alives arrive ($w1 -> $w2)"

# 5. kill -9: systemd restarts it (Restart=on-failure), and it serves again from its cache.
pid="$(ctr systemctl show -p MainPID --value vist2d.service)"
ctr systemctl kill -s KILL vist2d.service
for _ in $(seq 100); do
    npid="$(ctr systemctl show -p MainPID --value vist2d.service)"
    [[ "$npid" != 0 && "$npid" != "$pid" && "$(ctr systemctl is-active vist2d.service)" == active ]] && break
    sleep 0.1
done
[[ "$(ctr systemctl show -p NRestarts --value vist2d.service)" -ge 1 ]] || fail "no restart after SIGKILL"
again="$(as_alice compress --json /home/alice/doc.txt)" || fail "compress after the restart"
hits="$(grep -o '"prefix_cache_hits" *: *[0-9]*' <<<"$again" | grep -o '[0-9]*$')"
((hits == chunks - 1)) || fail "after kill -9 the cache served $hits of $((chunks - 1)) blocks: $again"
[[ -z "$(ctr find /var/cache/vist2 -name '.tmp-*')" ]] || fail "temporary files left in the cache"
ok "restarted after SIGKILL (pid $pid -> $npid) and served $hits of $((chunks - 1)) blocks from the cache"

ctr systemctl disable --now vist2d.socket vist2d.service >/dev/null 2>&1 || true
echo "systemd-test: 5 passed, 0 failed"

#!/usr/bin/env bash
# A real Slurm cluster on this one host: slurmctld + two slurmd daemons emulating the
# nodes `node1` and `node2` (partition `local` holding both, and partition `urgent` on the same
# nodes whose jobs preempt those of `local`), with its own munged.
#
#   bash slurm/local_cluster.sh start     # installs slurm-wlm + munge if missing (root + apt)
#                                         # (stdout is just the export line: eval "$(... start)")
#   export SLURM_CONF=/tmp/vltrain-slurm/slurm.conf   # printed by `start`
#   sbatch --nodes=2 --ntasks-per-node=1 --wrap 'srun hostname'
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop
#
# Everything (config, state, spool, logs, pid files, munge key and socket) lives in one
# state dir, $VLTRAIN_SLURM_DIR (default /tmp/vltrain-slurm), so several clusters with
# different dirs and port bases ($VLTRAIN_SLURM_PORT_BASE, default 17000: slurmctld on
# the base, node1/node2 on base+1/base+2) can coexist and nothing in /etc is changed
# except /etc/hosts (node1/node2 -> 127.0.0.1, added only when they don't resolve).
#
# Why our own munged: it listens on a socket inside the state dir (slurm.conf
# AuthInfo=socket=...), so we never depend on, restart or stop a system munge.
# Why two slurmd on one host: `slurmd -N <name>` picks its NodeName line; each node gets
# its own Port, pid file, spool dir and log via `%n`. Both share the host's cores, so each
# node advertises all of them (CPUs oversubscribed on purpose; SelectTypeParameters=CR_CPU,
# memory is not a consumable resource).
#
# Requires root (slurmd must be able to start jobs as any user). Tested with Debian 12's
# slurm-wlm 22.05.8 and munge 0.5.15.
set -euo pipefail

DIR="${VLTRAIN_SLURM_DIR:-/tmp/vltrain-slurm}"
PORT_BASE="${VLTRAIN_SLURM_PORT_BASE:-17000}"
START_TIMEOUT="${VLTRAIN_SLURM_START_TIMEOUT:-60}"   # seconds for the nodes to turn idle
STOP_TIMEOUT="${VLTRAIN_SLURM_STOP_TIMEOUT:-30}"     # seconds for the daemons to exit
NODES=(node1 node2)
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
export SLURM_CONF="$CONF"

log() { echo "[local_cluster] $*" >&2; }
die() { echo "[local_cluster] ERROR: $*" >&2; exit 1; }

# A live (not zombie) process; with a second argument, only if its name is that too, so a
# stale pid file whose pid was reused by another program never gets that program killed.
pid_alive() {
    [[ -n "${1:-}" && -r "/proc/$1/status" ]] || return 1
    grep -Eq '^State:[[:space:]]+Z' "/proc/$1/status" 2>/dev/null && return 1
    [[ -z "${2:-}" || "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]
}
# The pid in a pid file, printed only if that process is alive and has the daemon's name.
daemon_pid() {
    local f="$1" pid
    pid="$( { [[ -s "$f" ]] && tr -dc '0-9' <"$f"; } || true)"
    if pid_alive "$pid" "$(daemon_name "$f")"; then echo "$pid"; fi
}
daemon_name() { local b; b="$(basename "$1" .pid)"; echo "${b%%-*}"; }   # slurmd-node1.pid -> slurmd

# pid files of every daemon this cluster runs: munged, slurmctld, one slurmd per node.
daemon_pidfiles() {
    echo "$MUNGE_DIR/munged.pid"
    echo "$DIR/run/slurmctld.pid"
    local n
    for n in "${NODES[@]}"; do echo "$DIR/run/slurmd-$n.pid"; done
}

# ---------------------------------------------------------------------------- install
ensure_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root: install them (apt-get install ${missing[*]}) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get on this system"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        if ! getent hosts "$n" >/dev/null 2>&1; then
            [[ -w /etc/hosts ]] || die "node name $n does not resolve and /etc/hosts is not writable"
            log "adding '127.0.0.1 $n' to /etc/hosts"
            [[ ! -s /etc/hosts || -z "$(tail -c 1 /etc/hosts)" ]] || echo >>/etc/hosts
            echo "127.0.0.1 $n  # vltrain local Slurm cluster" >>/etc/hosts
        fi
    done
}

# ---------------------------------------------------------------------------- config
write_config() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="${VLTRAIN_SLURM_CPUS:-$(nproc)}"
    # Each emulated node claims most of the host's memory (they share it): jobs may ask
    # for --mem without being refused, and slurmd's RealMemory check passes.
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10240 ))
    mkdir -p "$DIR"/{state,run,log,spool}
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a two-node Slurm cluster emulated on $(hostname -s).
ClusterName=vltrain
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the two emulated nodes share one host (and containers rarely delegate cgroups).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Short timeouts: tests start, signal, requeue and stop jobs within seconds.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
OverTimeLimit=0
UnkillableStepTimeout=30
# Preemption as on shared clusters: a job of partition urgent (higher PriorityTier) takes the
# nodes of a running job of partition local, which gets SIGTERM, the partition's GraceTime
# to checkpoint, then SIGKILL, and is requeued by Slurm itself.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=node1,node2 Default=YES MaxTime=INFINITE OverSubscribe=NO PriorityTier=1 GraceTime=60 State=UP
PartitionName=urgent Nodes=node1,node2 MaxTime=INFINITE OverSubscribe=NO PriorityTier=2 PreemptMode=OFF State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# ---------------------------------------------------------------------------- daemons
start_munge() {
    # munged insists: socket dir executable by all, key 0600 owned by the daemon's user.
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$DIR" "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key"
        else   # munge < 0.5.14 has no mungekey (create-munge-key writes /etc only)
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
        fi
    fi
    chmod 600 "$MUNGE_DIR/munge.key"
    if [[ -n "$(daemon_pid "$MUNGE_DIR/munged.pid")" ]] && munge -S "$MUNGE_SOCKET" -n >/dev/null 2>&1; then
        return 0
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged refuses a socket whose parent dirs are not all world-executable
    # (e.g. under pytest's 0700 tmp dirs); only root uses this cluster, so allow it.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --log-file="$MUNGE_DIR/munged.log" --pid-file="$MUNGE_DIR/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged failed to start: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
    munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || die "munge round trip failed: $(tail -n 5 "$MUNGE_DIR/munged.log")"
}

start_slurm_daemons() {
    if [[ -z "$(daemon_pid "$DIR/run/slurmctld.pid")" ]]; then
        rm -f "$DIR/run/slurmctld.pid"
        slurmctld -f "$CONF" || die "slurmctld failed to start: $(tail -n 20 "$DIR/log/slurmctld.log" 2>/dev/null)"
    fi
    local n
    for n in "${NODES[@]}"; do
        if [[ -z "$(daemon_pid "$DIR/run/slurmd-$n.pid")" ]]; then
            rm -f "$DIR/run/slurmd-$n.pid"
            slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed to start: $(tail -n 20 "$DIR/log/slurmd-$n.log" 2>/dev/null)"
        fi
    done
}

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd-node1.log" "$DIR/log/slurmd-node2.log" "$MUNGE_DIR/munged.log"; do
        [[ -f "$f" ]] || continue
        echo "----- tail $f" >&2
        tail -n 15 "$f" >&2
    done
}

# Both nodes idle (a node running a job reads "mixed"/"allocated": also up and usable).
nodes_ready() {
    local states
    states="$(sinfo -h -N -p local -o '%N %T' 2>/dev/null)" || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing)\$" <<<"$states" || return 1
    done
}

wait_ready() {
    local start=$SECONDS deadline=$((SECONDS + START_TIMEOUT)) last=""
    while ! nodes_ready; do
        if ((SECONDS >= deadline)); then
            echo "[local_cluster] ERROR: nodes not idle after ${START_TIMEOUT}s (\`$0 stop\` cleans up); sinfo says:" >&2
            sinfo -N -o '%N %T %E' >&2 || true
            show_logs
            exit 1
        fi
        # A daemon that died (port taken by another cluster, bad config) will not come back.
        # (Give the forked daemons a moment to write their pid files first.)
        if ((SECONDS - start >= 2)) && ! is_running; then
            echo "[local_cluster] ERROR: a daemon exited during start (ports $PORT_BASE-$((PORT_BASE + 2)) in use? set VLTRAIN_SLURM_PORT_BASE; \`$0 stop\` cleans up):" >&2
            show_logs
            exit 1
        fi
        # A node that registered DOWN (e.g. left over from an unclean stop) is resumed.
        last="$(sinfo -h -N -o '%N %T' 2>/dev/null || true)"
        if grep -Eq ' (down|drained|draining|fail)' <<<"$last"; then
            scontrol update NodeName=node1,node2 State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
}

is_running() {
    local f
    while read -r f; do
        [[ -n "$(daemon_pid "$f")" ]] || return 1
    done < <(daemon_pidfiles)
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root; run as root"
    if [[ -f "$CONF" ]] && is_running && nodes_ready; then
        log "already running (state dir $DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    ensure_packages
    ensure_hosts
    write_config
    start_munge
    start_slurm_daemons
    wait_ready
    log "cluster up: nodes node1 node2 in partition 'local' (state dir $DIR)"
    echo "export SLURM_CONF=$CONF"
}

# Wait for a pid to exit; SIGKILL it after the timeout.
wait_gone() {
    local pid="$1" name="$2" deadline=$((SECONDS + STOP_TIMEOUT))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) still alive after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            return 0
        fi
        sleep 0.2
    done
}

# slurmstepd processes started by our slurmd daemons.
our_stepds() {
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        # slurmd runs with our SLURM_CONF in its environment and its cwd in our log dir;
        # the slurmstepd it forks inherit both.
        if [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)/" == "$DIR/"* ]] \
            || tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "$pid"
        fi
    done
}

cmd_stop() {
    [[ -f "$CONF" ]] || { log "no cluster in $DIR"; return 0; }
    # Cancel every job first so no job steps outlive the daemons.
    if [[ -n "$(daemon_pid "$DIR/run/slurmctld.pid")" ]]; then
        if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
            log "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
            squeue -h -o %i | xargs -r scancel --full 2>/dev/null || true
            local deadline=$((SECONDS + STOP_TIMEOUT))
            while [[ -n "$(squeue -h -t all -o '%i %T' 2>/dev/null | grep -Ev ' (CANCELLED|COMPLETED|FAILED|TIMEOUT|NODE_FAIL|PREEMPTED|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)$' || true)" ]]; do
                ((SECONDS < deadline)) || { log "jobs still not finished after ${STOP_TIMEOUT}s"; break; }
                sleep 0.5
            done
        fi
    fi
    local f pid name
    # slurmd first, then slurmctld, then the munged both authenticate through.
    for f in "$DIR/run/slurmd-node1.pid" "$DIR/run/slurmd-node2.pid" "$DIR/run/slurmctld.pid" "$MUNGE_DIR/munged.pid"; do
        pid="$(daemon_pid "$f")"
        name="$(basename "$f" .pid)"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait_gone "$pid" "$name"
        fi
        rm -f "$f"
    done
    local stepds
    stepds="$(our_stepds)"
    for pid in $stepds; do
        log "killing leftover slurmstepd $pid"
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in $stepds; do      # gone before we say stopped: a caller checks for survivors at once
        wait_gone "$pid" slurmstepd
    done
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "stopped (state dir $DIR)"
}

cmd_status() {
    local f pid
    while read -r f; do
        pid="$(daemon_pid "$f")"
        if [[ -n "$pid" ]]; then echo "$(basename "$f" .pid): running (pid $pid)"
        else echo "$(basename "$f" .pid): not running"; fi
    done < <(daemon_pidfiles)
    [[ -f "$CONF" ]] && echo "export SLURM_CONF=$CONF"
    if [[ -n "$(daemon_pid "$DIR/run/slurmctld.pid")" ]]; then
        sinfo -N -o '%N %P %T %C %E' || true
        squeue || true
    fi
    is_running
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 start|stop|status|restart   (state dir: \$VLTRAIN_SLURM_DIR, default /tmp/vltrain-slurm)" >&2; exit 2 ;;
esac

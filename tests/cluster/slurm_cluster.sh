#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for medgen's cluster tests (`make test-cluster`).
#
#   tests/cluster/slurm_cluster.sh up     # start munge, slurmctld and slurmd; wait until the node is idle
#   tests/cluster/slurm_cluster.sh down   # stop them; remove the cluster's folder but its log/
#   tests/cluster/slurm_cluster.sh env    # print the export line that points SLURM's commands at it
#
# Everything lives in $MEDGEN_SLURM_DIR (default /tmp/medgen-slurm): slurm.conf, a private munge key
# and socket, state, spool, logs. Nothing under /etc is changed and no system service is touched, so a
# machine's own SLURM or munge (if any) is left alone; this cluster listens on ports
# $MEDGEN_SLURM_PORT and $MEDGEN_SLURM_PORT+1 (default 16817, 16818) of 127.0.0.1.
# Needs Debian's slurm-wlm and munge packages (`make cluster-deps` installs them) and root, since
# slurmd starts jobs as the submitting user.
#
# The node has this machine's CPUs and memory. KillWait is 10 s (the time between SIGTERM and SIGKILL
# at a time limit or scancel) and a requeued job may start again 10 s after it ended (cred_expire).
set -euo pipefail

DIR="${MEDGEN_SLURM_DIR:-/tmp/medgen-slurm}"
PORT="${MEDGEN_SLURM_PORT:-16817}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

write_conf() {
    local cpus mem
    cpus="$(nproc --all)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$CONF" <<CONF
# written by tests/cluster/slurm_cluster.sh
ClusterName=medgen-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=use_interactive_step
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as the submitting user)"
    for cmd in munged slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found: install Debian's slurm-wlm and munge (make cluster-deps)"
    done
    if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        die "a cluster is already running from $DIR (tests/cluster/slurm_cluster.sh down stops it)"
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
    write_conf
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N "$NODE"
    for _ in $(seq 60); do
        state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
        [ "$state" = idle ] && { echo "SLURM $(sinfo -V | cut -d' ' -f2) up: node $NODE idle ($DIR)"; return 0; }
        sleep 1
    done
    echo "--- slurmctld.log"; tail -20 "$DIR/log/slurmctld.log" >&2 || true
    echo "--- slurmd.log"; tail -20 "$DIR/log/slurmd.log" >&2 || true
    down
    die "node $NODE did not become idle within 60 s (state: ${state:-none}); logs above"
}

stop_pidfile() {
    local f="$1" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    [ -d "$DIR" ] || return 0
    SLURM_CONF="$CONF" scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    stop_pidfile "$DIR/run/slurmd-$NODE.pid"
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/run/munged.pid"
    rm -rf "$DIR"/{munge,state,spool,run,slurm.conf}
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 up|down|env" ;;
esac

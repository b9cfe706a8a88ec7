#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, as root and without systemd,
# so CI can run the pipeline through `--profile profiles/slurm` against real daemons.
#
#   sudo .ci/slurm/start.sh            # install (if needed), configure, start, wait for idle
#   sudo .ci/slurm/stop.sh             # kill exactly the daemons this script started
#
# What it sets up:
#   - Debian packages slurmctld slurmd slurm-client munge (install.sh, only if missing)
#   - /etc/slurm/slurm.conf and gres.conf (refuses to overwrite files it did not write)
#   - one node (this host, its real CPUs and memory) with two fake GPU slots
#     (gres.conf maps them to /dev/tty0-1) so that `--gpus` requests schedule
#   - one partition, $GRADLOC_SLURM_PARTITION (default "debug")
#   - no accounting database: status checks must use squeue; every finished job is
#     recorded as one line in $STATE/jobcomp.log (jobcomp/filetxt) for tests to check
#   - daemons: munged (as user munge), slurmctld, slurmd; PIDs in $STATE/pids
#
# State, logs and PID files live in $GRADLOC_SLURM_DIR (default /tmp/gradloc-slurm).
set -euo pipefail

STATE=${GRADLOC_SLURM_DIR:-/tmp/gradloc-slurm}
PARTITION=${GRADLOC_SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
MARKER="# written by gradloc .ci/slurm/start.sh"

die() { echo "slurm/start.sh: error: $*" >&2; exit 1; }
log() { echo "slurm/start.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"

# 1. Packages.
"$(dirname "$0")/install.sh"

# Already running from an earlier start? Then there is nothing to do.
if [ -f "$STATE/pids" ] && timeout 10 sinfo -h >/dev/null 2>&1; then
    alive=1
    while read -r _ pid; do kill -0 "$pid" 2>/dev/null || alive=0; done < "$STATE/pids"
    if [ "$alive" = 1 ]; then log "already running (see $STATE/pids)"; exit 0; fi
    die "stale $STATE/pids: some daemons died; run .ci/slurm/stop.sh first"
fi

mkdir -p "$STATE"/{ctld,spool,log}
: > "$STATE/pids"

# 2. Configuration, from this machine's real hardware (slurmd -C prints its node line).
HOST=$(hostname -s)
hw=$(slurmd -C | head -1)
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<< "$hw")
boards=$(sed -n 's/.* Boards=\([0-9]*\).*/\1/p' <<< "$hw")
sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<< "$hw")
cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<< "$hw")
threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<< "$hw")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<< "$hw")
[ -n "$cpus" ] && [ -n "$mem" ] || die "could not read the hardware from 'slurmd -C': $hw"
# Leave some memory to the OS and the daemons; slurmd refuses a node that claims more.
mem=$(( mem * 9 / 10 ))

mkdir -p "$CONF_DIR"
for f in slurm.conf gres.conf; do
    if [ -s "$CONF_DIR/$f" ] && ! grep -qF "$MARKER" "$CONF_DIR/$f"; then
        die "$CONF_DIR/$f exists and was not written by this script; not overwriting it"
    fi
done

cat > "$CONF_DIR/slurm.conf" <<EOF
$MARKER
# Single-node test cluster: controller and compute node on $HOST, over loopback so
# that no name resolution is needed.
ClusterName=gradloc-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups and no systemd in CI containers: track processes by parent PID.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
# Memory is checked per job (--mem must fit the node) but not reserved, so that on a small
# CI machine a 16 GB training job and an 8 GB data job can still run side by side.
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
GresTypes=gpu
ReturnToService=2
# squeue and scontrol keep finished jobs visible this long (seconds): the Snakemake SLURM
# plugin needs at least 3x its first status-check delay or it falls back to sacct (no
# database here), and tests inspect every job of a run after it ends.
MinJobAge=3600
# No slurmdbd: accounting off, but each finished job is appended to a text file.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

cat > "$CONF_DIR/gres.conf" <<EOF
$MARKER
# Two fake GPU slots: any two device files will do, SLURM only counts and hands them out.
Name=gpu File=/dev/tty[0-1]
EOF

# 3. munge: shared-key authentication between the SLURM daemons and clients.
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running; using it"
else
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged   # daemonizes and writes its pid file
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    [ -s /run/munge/munged.pid ] || die "munged did not start"
    echo "munged $(cat /run/munge/munged.pid)" >> "$STATE/pids"
fi

# 4. SLURM daemons. -c: start from a clean state (no jobs from an earlier cluster).
start_daemon() {  # name, pid file, command...
    local name=$1 pidfile=$2; shift 2
    rm -f "$pidfile"
    "$@" || die "$name failed to start; see $STATE/log/$name.log"
    for _ in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.1; done
    [ -s "$pidfile" ] || die "$name wrote no pid file; see $STATE/log/$name.log"
    echo "$name $(cat "$pidfile")" >> "$STATE/pids"
}
start_daemon slurmctld "$STATE/slurmctld.pid" slurmctld -c
start_daemon slurmd "$STATE/slurmd.pid" slurmd

# 5. Wait until the node takes jobs (a daemon that died after daemonizing fails fast).
state="" deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
    while read -r name pid; do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$STATE/log/$name.log" >&2 2>/dev/null; die "$name ($pid) died"; }
    done < "$STATE/pids"
    state=$(timeout 5 sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
if [ "$state" != idle ]; then
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "node $HOST is '${state:-unreachable}', not idle, after 60 s"
fi
log "cluster up: partition $PARTITION, node $HOST ($cpus CPUs, ${mem} MB, gpu:2); state in $STATE"
sinfo -N -o "%N %P %t %c %m %G" >&2

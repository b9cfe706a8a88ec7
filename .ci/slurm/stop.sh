#!/usr/bin/env bash
# Stop the daemons .ci/slurm/start.sh started, by the PIDs it recorded (never by name),
# after cancelling any jobs still in the queue.
set -uo pipefail

STATE=${GRADLOC_SLURM_DIR:-/tmp/gradloc-slurm}
PIDS="$STATE/pids"

if [ ! -f "$PIDS" ]; then
    echo "slurm/stop.sh: nothing to stop ($PIDS missing)" >&2
    exit 0
fi

# Jobs first, while slurmctld can still cancel them (it signals their processes).
if command -v scancel >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; then
    timeout 10 scancel --quiet --user=root 2>/dev/null || true
fi

# Reverse start order: slurmd, slurmctld, munged.
status=0
for entry in $(tac "$PIDS" | tr ' ' ':'); do
    name=${entry%%:*} pid=${entry##*:}
    kill -0 "$pid" 2>/dev/null || { echo "slurm/stop.sh: $name ($pid) already gone" >&2; continue; }
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm/stop.sh: $name ($pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        status=1
    fi
    echo "slurm/stop.sh: stopped $name ($pid)" >&2
done
rm -f "$PIDS"
exit $status

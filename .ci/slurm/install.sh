#!/usr/bin/env bash
# Install Debian's SLURM (controller, node daemon, client tools) and munge, if missing.
# apt-get starts nothing here: without systemd the packages' start step fails harmlessly
# (or policy-rc.d forbids it); .ci/slurm/start.sh starts the daemons itself.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm/install.sh: must run as root" >&2; exit 1; }
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
echo "slurm/install.sh: installing slurmctld slurmd slurm-client munge" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null

#!/usr/bin/env bash
# The system packages that some tests use for real: Open MPI (mpirun, mpi4py's runtime) and SLURM with munge (the
# launcher tests start a two-node cluster on loopback). `make test` runs this first; run it yourself to install them:
#
#   sudo tools/system_packages.sh
#
# Installs what is missing with apt-get when run as root on a machine that has apt-get; elsewhere it installs nothing,
# says which tests will be skipped and the command that enables them, and exits 0 (the rest of the suite still runs).
set -euo pipefail

packages=()
command -v mpirun >/dev/null 2>&1 || packages+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null 2>&1 || packages+=(slurmctld slurmd slurm-client munge)
[ ${#packages[@]} -eq 0 ] && exit 0

install="apt-get install -y --no-install-recommends ${packages[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the Open MPI / SLURM packages the MPI and SLURM tests use: $install"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
    exit 0
  fi
  echo "tools/system_packages.sh: error: apt-get could not install ${packages[*]} (its message is above); fix apt" \
       "(network, sources) and run make test again" >&2
  exit 1
fi

if command -v apt-get >/dev/null 2>&1; then
  how="sudo tools/system_packages.sh   (runs: apt-get update && $install)"
else
  how="install ${packages[*]} (Debian names) with this system's package manager"
fi
echo "NOTE: ${packages[*]} not installed and not installable here (needs root and apt-get): the MPI and SLURM" \
     "tests will be skipped (pytest lists them at the end). To run them: $how"

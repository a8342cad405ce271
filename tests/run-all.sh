#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian 12 machine, then run
# lint, type checks and the whole test suite.  Run as root: the real
# components (Slurm, sshd, PostgreSQL, PAM) are installed with apt-get and
# started by the tests themselves on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  python3 python3-venv python3-dev
  slurmctld slurmd slurmrestd slurm-client slurm-wlm-jwt-plugin munge
  openssh-server openssh-client pamtester libpam-modules
  # The native PAM module (producer/pam) is built by its Makefile.
  make gcc libc6-dev libpam0g-dev
  postgresql
  systemd util-linux
  # The man pages are checked with man --warnings, groff -ww and lexgrog.
  man-db groff-base
  # Slurm 24.11 runs from a Debian 13 root the tests build (and cache) with these.
  debootstrap debian-archive-keyring
  # promtool checks the alert rules and a daemon's metrics (20 MB to fetch,
  # 96 MB installed, seconds; under systemd Debian also starts the server it
  # brings, on port 9090: the tests use promtool only).
  prometheus
)
if [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "run-all: not root: real-component tests will be skipped (CI=true makes them fail)" >&2
fi

# Debian's interpreter, not pyenv's: job users must be able to run the venv.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/pytest "$@"

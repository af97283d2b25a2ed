#!/usr/bin/env bash
# Bring a fresh Debian 12 / Ubuntu 24.04 machine (as root) to where `make test` runs:
# the system packages the build and the system tests need, then the dev virtualenv .venv.
# Idempotent and fast when nothing changed: apt is not touched when every package is
# installed, and pip is not run when pyproject.toml is the one .venv was built from.
#
#   scripts/bootstrap.sh            system packages + .venv
#   scripts/bootstrap.sh --system   system packages only (what `make deb` needs)
#   scripts/bootstrap.sh --venv     .venv only
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
  systemd-container libsystemd-dev pkg-config gcc
  python3 python3-dev python3-pip python3-venv
  dbus systemd dpkg-dev fakeroot curl openssl iproute2 util-linux
  # scripts/build-llama-server.sh: the real llama-server the tests run, built from source;
  # strace slows its model load down in one test (tests/integration/test_llama_server.py)
  cmake g++ make strace
)
APT_STAMP=/var/lib/apt/periodic/sparkd-bootstrap-update-success
VENV=.venv
VENV_STAMP="$VENV/.sparkd-bootstrap-stamp"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

missing_packages() {
  local pkg status
  for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    [[ "$status" == ii* ]] || printf '%s\n' "$pkg"
  done
}

apt_lists_stale() {
  # No package lists at all (fresh container images ship none), or our last update is
  # more than a day old (or never happened).
  compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || return 0
  [[ -e "$APT_STAMP" ]] || return 0
  [[ -n "$(find "$APT_STAMP" -mmin +1440 2>/dev/null)" ]]
}

apt_update() {
  log "apt-get update"
  apt-get update -q
  mkdir -p "$(dirname "$APT_STAMP")"
  touch "$APT_STAMP"
}

system_packages() {
  local missing
  mapfile -t missing < <(missing_packages)
  if ((${#missing[@]} == 0)); then
    log "system packages: all ${#PACKAGES[@]} installed"
    return
  fi
  if ((EUID != 0)); then
    log "missing packages: ${missing[*]}"
    log "run this script as root (or: sudo apt-get install ${missing[*]})"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if apt_lists_stale; then
    apt_update
  fi
  log "apt-get install ${missing[*]}"
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    # The lists may name versions the mirror no longer has: refresh once and retry.
    apt_update
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

venv_key() {
  # What .venv was built from: the python it runs and the project's metadata.
  { "$VENV/bin/python" -c 'import sys; print(sys.version)'; sha256sum pyproject.toml; } | sha256sum
}

dev_venv() {
  if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
    log "$VENV is broken (its python does not run): recreating it"
    rm -rf "$VENV"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $(command -v python3) ($(python3 --version))"
    python3 -m venv "$VENV"
  fi
  local key
  key=$(venv_key)
  if [[ -f "$VENV_STAMP" && "$(cat "$VENV_STAMP")" == "$key" ]]; then
    log "$VENV: up to date with pyproject.toml"
    return
  fi
  log "pip install -e '.[test]' into $VENV"
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  printf '%s\n' "$key" >"$VENV_STAMP"
}

case "${1:-all}" in
  all) system_packages; dev_venv ;;
  --system) system_packages ;;
  --venv) dev_venv ;;
  *) log "usage: $0 [--system|--venv]"; exit 2 ;;
esac

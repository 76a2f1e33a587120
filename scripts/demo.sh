#!/usr/bin/env bash
# The whole stack on one machine, for a first look:
#   scripts/demo.sh [--listen 127.0.0.1:8080] [--nats URL]
# then `curl http://127.0.0.1:8080/` a few times; ctrl-c stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/provision.sh
exec cargo run --release --quiet -- demo "$@"

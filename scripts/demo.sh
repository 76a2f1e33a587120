#!/usr/bin/env bash
# The whole stack on one machine, for a first look:
#   scripts/demo.sh [--listen 127.0.0.1:8080] [--nats URL]
# then `curl http://127.0.0.1:8080/` a few times; ctrl-c stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/provision.sh
if [[ ! -x target/release/rollcall ]]; then
  echo "building rollcall (release); the first time takes a few minutes" >&2
fi
# Cargo's own progress shows; a rebuild with nothing changed is a no-op.
cargo build --release --bin rollcall
exec target/release/rollcall demo "$@"

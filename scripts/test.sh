#!/usr/bin/env bash
# The whole test suite, on a fresh machine with Rust and Python 3:
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PROVISION_CHROMIUM=1 source scripts/provision.sh
cargo test --locked --all-targets "$@"
cargo test --locked --doc

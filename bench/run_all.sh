#!/usr/bin/env bash
# Runs every benchmark once, in sequence (each script starts and stops its own
# processes), and prints only the summary lines: criterion's in-process
# figures, proxy, churn (keep-alive and Connection: close), convergence,
# discovery at scale. About 25 minutes on 2 cores (plus first-time builds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
cargo bench --bench fold --bench rotation -- --warm-up-time 1 --measurement-time 3 2>/dev/null \
  | awk '/^[a-z_]+\/[a-z0-9_]+/{name=$1} /thrpt:/ && name!="" {gsub(/[][]/,""); print "CRITERION figure=" name " thrpt=" $4 $5 " [" $2 $3 ".." $6 $7 "]"; name=""}'
"$here/proxy.sh" | grep -E '^(VERSIONS|SUMMARY|RATIO)'
"$here/churn.sh" | grep '^CHURN_SUMMARY'
CONN_MODE=close "$here/churn.sh" | grep '^CHURN_SUMMARY'
"$here/convergence.sh" | grep '^CONVERGENCE'
"$here/discovery_scale.sh" | grep -E '^(DISCOVERY_SCALE|NATS_RAW)'
"$here/balancer_memory.sh" | grep "^BALANCER_MEMORY"
"$here/override.sh" | grep '^OVERRIDE'

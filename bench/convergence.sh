#!/usr/bin/env bash
# How fast membership changes reach the balancer, end to end through real
# processes: nats-server, `rollcall discovery`, `rollcall balancer ... conv`,
# and the bench_convergence client (its own backends, publishing their
# events over NATS, requests flowing through the balancer all along).
#
#   register → first request routed to the new instance      (goal p99 ≤ 20 ms)
#   deregister → last request routed to it                    (goal p99 ≤ 20 ms)
#   crash (heartbeats stop) → last routed request − deadline  (goal ≤ 50 ms past the TTL)
#   kill (heartbeats stop, port closes) → failed client requests (goal 0)
#
# Prints one CONVERGENCE line per figure (p50/p99/max over the trials).
# Env: TRIALS (100), CRASH_TRIALS (100), KILL_TRIALS (20), TTL (500ms: the
#      mechanism is the same as with the 3 s default, the run 6× shorter),
#      PROBERS (2 request loops)
source "$(dirname "$0")/lib.sh"

TRIALS="${TRIALS:-100}"; CRASH_TRIALS="${CRASH_TRIALS:-100}"; KILL_TRIALS="${KILL_TRIALS:-20}"
TTL="${TTL:-500ms}"; PROBERS="${PROBERS:-2}"
ensure_packages curl
ensure_nats
build_rollcall bench_convergence
versions
start_nats
start_discovery
start_balancer "" conv
timeout 600 "$EXAMPLES_DIR/bench_convergence" --nats "$NATS_URL_BENCH" --balancer "http://127.0.0.1:$ROLLCALL_PORT/" \
  --service conv --trials "$TRIALS" --crash-trials "$CRASH_TRIALS" --kill-trials "$KILL_TRIALS" --ttl "$TTL" --probers "$PROBERS"

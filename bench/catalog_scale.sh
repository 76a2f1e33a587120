#!/usr/bin/env bash
# Catalog version 3 at scale: one nats-server, one `rollcall discovery`, one
# `rollcall balancer ... web`, and bench_catalog_scale registering N
# instances of ONE service (on 8 real backends started by the client, which
# they share by port). For N in SIZES it prints one CATALOG_SCALE line:
#   join_s        - from the first register until the balancer's /catalog
#                   lists all N;
#   served        - of 100 requests through the balancer, answered 200;
#   request_p99_ms - their p99 (each on a fresh connection);
#   catalog_p99_ms - p99 of 20 reads of /catalog once all N are listed;
#   change_bytes  - bytes on the wire (subject + headers + payload of every
#                   message on rollcall.catalog.> and rollcall.catalog-store.>)
#                   for ONE instance's deregistration, and change_messages.
# Then, with ROLLING instances, one ROLLING_RESTART line: every instance
# deregisters and registers again on another port, in waves of 10%, under a
# request loop: catalog bytes and messages, wall time until the balancer
# shows the final set, failed requests (0 expected).
#
# Every size runs on a fresh server, discovery and balancer.
# Env: SIZES ("1000 10000 100000"), ROLLING (10000; 0 skips it),
#      RATE (registers/s, 20000), PROFILE (release; debug uses the debug
#      build as it is, for a smoke run: bytes are the same, times are not).
source "$(dirname "$0")/lib.sh"

SIZES="${SIZES:-1000 10000 100000}"
ROLLING="${ROLLING:-10000}"
RATE="${RATE:-20000}"
PROFILE="${PROFILE:-release}"
if [[ "$PROFILE" == debug ]]; then
  ROLLCALL_BIN="$TARGET_DIR/debug/rollcall"
  EXAMPLES_DIR="$TARGET_DIR/debug/examples"
  (cd "$ROOT" && cargo build -q --bin rollcall --example bench_catalog_scale) >&2
  ROLLCALL_BUILD=debug
else
  build_rollcall bench_catalog_scale
fi
ensure_nats
versions

run() {  # run N [--rolling]
  start_nats
  start_discovery
  start_balancer "" web
  "$EXAMPLES_DIR/bench_catalog_scale" --nats "$NATS_URL_BENCH" \
    --balancer "127.0.0.1:$ROLLCALL_PORT" --admin "127.0.0.1:$ROLLCALL_ADMIN_PORT" \
    --instances "$1" --rate "$RATE" "${@:2}" || echo "CATALOG_SCALE instances=$1 failed=1"
  stop_pid "$BALANCER_PID"; stop_pid "$DISCOVERY_PID"; stop_pid "$NATS_PID"
}

for n in $SIZES; do
  log "instances=$n"
  if [[ "$n" == "$ROLLING" ]]; then run "$n" --rolling; else run "$n"; fi
done
if [[ "$ROLLING" != 0 && " $SIZES " != *" $ROLLING "* ]]; then
  log "rolling restart of $ROLLING"
  run "$ROLLING" --rolling
fi

#!/usr/bin/env bash
# Discovery through a real nats-server at scale: for each fleet size in
# SIZES, a fresh nats-server (JetStream, empty store) and `rollcall
# discovery`; bench_discovery_load makes every instance join, then sends
# heartbeats at RATE/s in total for DUR while a probe instance joins or
# leaves every 100 ms. Reports discovery CPU, RSS per live instance, the
# probe's snapshot propagation (publish → snapshot received), snapshots that
# should not have happened (expiries: lost heartbeats), slow consumers seen by
# the server and logged by discovery. Then the raw NATS pub→sub rate of
# 200-byte messages on the same server, the ceiling for any consumer here.
#
# Goals: ≥ 250,000 heartbeats/s with 10,000 live instances, propagation p99
# ≤ 50 ms, ≤ 1 KiB per live instance, no expiries, no slow consumer.
# Prints one DISCOVERY_SCALE line per size and rate, one NATS_RAW line.
# Env: SIZES ("1000 10000 50000"), RATES ("250000"), DUR (10), SERVICES (100),
# PARTITIONS (unset; e.g. "0-15/16": the server gets nats/cluster/partitions.conf
# and discovery runs as one shard owning those partitions, a writer each;
# the lines then say partitions=...).
source "$(dirname "$0")/lib.sh"

if [[ -n "${PARTITIONS:-}" ]]; then
  NATS_CONFIG="$ROOT/nats/cluster/partitions.conf"; DISCOVERY_ARGS="--partitions $PARTITIONS"
fi

SIZES="${SIZES:-1000 10000 50000}"; RATES="${RATES:-250000}"; DUR="${DUR:-10}"; SERVICES="${SERVICES:-100}"
ensure_packages curl
ensure_nats
build_rollcall bench_discovery_load
versions

varz() { curl -s "http://127.0.0.1:$NATS_MON_PORT/varz" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("slow_consumers", "?"))'; }
discovery_conn() {  # messages the server delivered to discovery, and what is pending for it
  curl -s "http://127.0.0.1:$NATS_MON_PORT/connz?limit=1024" | python3 -c '
import json, sys
conns = [c for c in json.load(sys.stdin)["connections"] if c.get("name") == "rollcall-discovery"]
c = conns[0] if conns else {}
print("server_out_msgs_to_discovery=%s server_pending_bytes_to_discovery=%s" % (c.get("out_msgs", "?"), c.get("pending_bytes", "?")))'
}

for n in $SIZES; do
  for rate in $RATES; do
    start_nats
    start_discovery
    line="$(timeout 400 "$EXAMPLES_DIR/bench_discovery_load" --nats "$NATS_URL_BENCH" --discovery-pid "$DISCOVERY_PID" \
      --instances "$n" --services "$SERVICES" --rate "$rate" --duration "${DUR}s" || echo "DISCOVERY_SCALE instances=$n rate_target=$rate failed=1")"
    slow_server="$(varz)"
    conn="$(discovery_conn)"
    slow_log="$(grep -c 'slow consumer: NATS dropped' "$DISCOVERY_LOG" || true)"
    unstored_log="$(grep -c 'was not stored' "$DISCOVERY_LOG" || true)"
    echo "$line partitions=${PARTITIONS:-none} server_slow_consumers=$slow_server discovery_slow_consumer_logs=$slow_log discovery_unstored_logs=$unstored_log $conn"
    stop_pid "$DISCOVERY_PID"; stop_pid "$NATS_PID"
  done
done

start_nats
timeout 120 "$EXAMPLES_DIR/bench_discovery_load" --nats "$NATS_URL_BENCH" --raw --duration 5s
stop_pid "$NATS_PID"

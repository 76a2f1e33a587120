#!/usr/bin/env bash
# Balancer memory with many instances: nats-server, `rollcall discovery`,
# `rollcall balancer ... web`, and INSTANCES instances of `web` announced by
# bench_fleet (addresses 127.0.0.1:20000 and up; nothing needs to listen
# there, the balancer connects only when a request comes). Prints the
# balancer's RSS once every instance is in the catalog.
# Goal: ≤ 30 MiB with 1,000 instances.
# Env: INSTANCES (1000)
source "$(dirname "$0")/lib.sh"

INSTANCES="${INSTANCES:-1000}"
ensure_nats
build_rollcall bench_fleet
versions
start_nats
start_discovery
start_balancer "" web
rss_empty="$(awk '/^VmRSS:/{print $2}' "/proc/$BALANCER_PID/status")"
addrs=(); for ((i=0; i<INSTANCES; i++)); do addrs+=("127.0.0.1:$((20000 + i))"); done
start_fleet "" web "${addrs[@]}"
for ((i=0; i<600; i++)); do
  (( $(grep -c ' joined' "$DISCOVERY_LOG" || true) >= INSTANCES )) && break
  sleep 0.1
done
held() { curl -s "http://127.0.0.1:$ROLLCALL_ADMIN_PORT/catalog" | grep -o '"id":' | wc -l; }
for ((i=0; i<100; i++)); do (( $(held) >= INSTANCES )) && break; sleep 0.1; done
joined="$(held)"  # as the balancer holds them (its /catalog)
rss="$(awk '/^VmRSS:/{print $2}' "/proc/$BALANCER_PID/status")"
echo "BALANCER_MEMORY figure=balancer_memory instances=$joined rss_empty_mib=$(echo "scale=1; $rss_empty/1024" | bc) rss_mib=$(echo "scale=1; $rss/1024" | bc)"

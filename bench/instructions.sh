#!/usr/bin/env bash
# CPU instructions per proxied request: rollcall's balancer, nginx and HAProxy,
# each run under `valgrind --tool=callgrind` with the same request mix.
#
# Unlike req/s, instruction counts do not depend on what else the machine is
# doing, so this is the figure to compare changes by on a busy machine.
#
# Each proxy, one thread (nginx `master_process off; worker_processes 1`,
# HAProxy -db `nbthread 1`, rollcall `--workers 1` on the fixed set of
# examples/static_balancer.rs), round-robin over the same three keep-alive
# backends, runs twice under callgrind: once idle (started, port open,
# stopped) and once serving exactly REQUESTS keep-alive GETs over CONNS
# connections (keepalive_client.py; wrk runs for a time, not a count). Instructions per request =
# (Ir of the loaded run - Ir of the idle run) / requests answered.
#
# Callgrind's cache simulation (--cache-sim=yes, first-level caches as this
# CPU's) also counts first-level instruction and data cache misses per
# request: the part of a real CPU's time per request that an instruction
# count does not show (a big code path misses the instruction cache more).
#
# Prints one INSTRUCTIONS line per proxy and the ratios rollcall/nginx and
# rollcall/haproxy (below 1: rollcall spends fewer instructions, or misses
# the caches less).
#
# Env: REQUESTS (20000), CONNS (4), PROXIES ("rollcall nginx haproxy"),
#      ROLLCALL_ARGS (arguments before the addresses, "--workers 1"),
#      STATIC_BALANCER (a static_balancer binary to measure instead of
#      building this checkout's, e.g. an older build kept for comparison),
#      PGO (1: the profile-guided build of scripts/build-pgo.sh; 0: the
#      plain release build)
source "$(dirname "$0")/lib.sh"
PGO="${PGO:-1}"

REQUESTS="${REQUESTS:-20000}"; CONNS="${CONNS:-4}"
PROXIES="${PROXIES:-rollcall nginx haproxy}"
ROLLCALL_ARGS="${ROLLCALL_ARGS---workers 1}"
ensure_packages nginx haproxy valgrind python3
if [[ -z "${STATIC_BALANCER:-}" ]]; then
  build_rollcall static_balancer
  STATIC_BALANCER="$EXAMPLES_DIR/static_balancer"
else
  ROLLCALL_BUILD="given:$STATIC_BALANCER"
fi
versions
echo "VERSIONS valgrind=$(valgrind --version)"
log "requests=$REQUESTS conns=$CONNS proxies=$PROXIES"

start_backends ""
write_nginx_conf
write_nginx_upstreams "${BACKEND_PORTS[@]}"
# One process serving: no master, no daemon (already off), one worker.
sed -i 's/^master_process on;/master_process off;/' "$RUN_DIR/nginx/nginx.conf"
write_haproxy_cfg "$RUN_DIR/haproxy/haproxy.cfg" "${BACKEND_PORTS[@]}"

declare -A PORT=([rollcall]="$ROLLCALL_PORT" [nginx]="$NGINX_PORT" [haproxy]="$HAPROXY_PORT")

proxy_cmd() {  # proxy_cmd NAME: the command line serving on PORT[NAME]
  local b
  case "$1" in
    rollcall)
      # shellcheck disable=SC2086
      echo "$STATIC_BALANCER" $ROLLCALL_ARGS "127.0.0.1:$ROLLCALL_PORT" \
        "${BACKEND_PORTS[@]/#/127.0.0.1:}" ;;
    nginx) echo nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx" -c "$RUN_DIR/nginx/nginx.conf" ;;
    haproxy) echo haproxy -db -f "$RUN_DIR/haproxy/haproxy.cfg" ;;
  esac
}

# Its way of stopping cleanly, so callgrind writes its counts out.
declare -A STOP_SIGNAL=([rollcall]=INT [nginx]=QUIT [haproxy]=USR1)

# callgrind_run NAME LOAD(0|1): prints the totals of one run (Ir, I1 and D1
# read and write misses) and, loaded, the COUNT fields
callgrind_run() {
  local name="$1" load="$2" out="$RUN_DIR/callgrind.$1.$2" pid i line=""
  assert_port_free "${PORT[$name]}"
  # shellcheck disable=SC2046
  valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" $(proxy_cmd "$name") \
    >"$RUN_DIR/$name.$load.log" 2>&1 &
  pid=$!; track "$pid"
  wait_port "${PORT[$name]}" 120
  if [[ "$load" == 1 ]]; then
    line="$(python3 "$BENCH_DIR/keepalive_client.py" 127.0.0.1 "${PORT[$name]}" "$REQUESTS" "$CONNS" | grep '^COUNT')"
  fi
  kill "-${STOP_SIGNAL[$name]}" "$pid"
  for ((i=0; i<1200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  wait "$pid" 2>/dev/null || true
  [[ -s "$out" ]] || { echo "no callgrind output for $name (log: $RUN_DIR/$name.$load.log)" >&2; exit 1; }
  # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
  echo "$(awk '/^(summary|totals):/{print "ir=" $2, "i1=" $5, "d1=" $6 + $7; exit}' "$out") ${line#COUNT }"
}

RES="$RUN_DIR/instructions.tsv"
for p in $PROXIES; do
  idle="$(callgrind_run "$p" 0)"
  loaded="$(callgrind_run "$p" 1)"
  python3 - "$p" "$idle" "$loaded" "$RUN_DIR/$p.cmd" <<'PY' | tee -a "$RES"
import sys
name, idle, loaded = sys.argv[1], sys.argv[2], sys.argv[3]
kv = lambda s: {a: b for a, b in (x.split("=", 1) for x in s.split() if "=" in x)}
i, l = kv(idle), kv(loaded)
n = int(l["requests"])
bad = int(l["non2xx"]) + int(l["errors"])
if n == 0 or bad:
    sys.exit(f"{name}: {n} requests answered, {bad} failed")
per = lambda key: (int(l[key]) - int(i[key])) / n
print(f"INSTRUCTIONS proxy={name} requests={n} ir_loaded={l['ir']} ir_idle={i['ir']} ir_per_request={per('ir'):.0f}"
      f" i1_misses_per_request={per('i1'):.0f} d1_misses_per_request={per('d1'):.0f}")
PY
done

python3 - "$RES" <<'PY'
import sys
per = {}
for line in open(sys.argv[1]):
    f = dict(x.split("=", 1) for x in line.split()[1:])
    per[f["proxy"]] = f
for other in ("nginx", "haproxy"):
    if "rollcall" in per and other in per:
        ratio = lambda key: float(per["rollcall"][key]) / float(per[other][key])
        print(f"RATIO figure=instructions rollcall/{other} ir_ratio={ratio('ir_per_request'):.3f}"
              f" i1_miss_ratio={ratio('i1_misses_per_request'):.3f}")
PY

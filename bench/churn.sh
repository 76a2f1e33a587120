#!/usr/bin/env bash
# Membership churn under load: wrk keeps CONNS connections busy for DUR
# seconds while backend 3 joins or leaves every INTERVAL (0.1 s), so the set
# alternates {1,2,3} <-> {1,2}. Counts the requests that failed.
#
# Modes (MODES env, default all):
#   rollcall      discovery + balancer; backend 3 registers / deregisters over
#                 NATS (bench_fleet --churn); the balancer swaps its set in memory
#   nginx_reload  the consul-template way: re-render upstreams.conf + `nginx -s reload`
#   haproxy_sf    re-render the cfg + `haproxy -f cfg -sf <old pid>` (classic soft reload)
#   haproxy_sf_x  same with `-x <stats socket>` (listening sockets handed over)
# Prints one CHURN line per mode and rep: changes made, wrk socket errors by
# kind, non-2xx, errors_total, req/s, p50/p99/max; CHURN_SUMMARY per mode.
#
# Env: LAYOUT (w0_p1_b01), DUR (30), INTERVAL (0.1), CONNS (50), REPS (1),
#      CONN_MODE keepalive (default) | close (`Connection: close`: a new TCP connection per request)
source "$(dirname "$0")/lib.sh"

LAYOUT="${LAYOUT:-w0_p1_b01}"; DUR="${DUR:-30}"; INTERVAL="${INTERVAL:-0.1}"; CONNS="${CONNS:-50}"
CONN_MODE="${CONN_MODE:-keepalive}"; REPS="${REPS:-1}"
WRK_EXTRA=(); [[ "$CONN_MODE" == close ]] && WRK_EXTRA=(-H "Connection: close")
MODES="${MODES:-rollcall nginx_reload haproxy_sf haproxy_sf_x}"
set_layout
ensure_packages nginx haproxy wrk curl
ensure_nats
build_rollcall bench_fleet
versions
log "layout=$LAYOUT dur=${DUR}s interval=${INTERVAL}s conns=$CONNS conn_mode=$CONN_MODE modes=$MODES"
start_backends "$BACKEND_CPU"
ADDRS=("${BACKEND_PORTS[@]/#/127.0.0.1:}")

HCFG="$RUN_DIR/haproxy/haproxy.cfg"
HAPIDS=()

render() {  # render N: the template step; 3 = all backends, 2 = without backend 3
  local ports=("${BACKEND_PORTS[@]:0:$1}")
  case "$MODE" in
    nginx_*) write_nginx_upstreams "${ports[@]}" ;;
    haproxy_*) write_haproxy_cfg "$HCFG" "${ports[@]}" ;;
  esac
}

haproxy_spawn() {  # a new haproxy that soft-stops the latest one (like -sf $(cat pidfile))
  local last=""
  ((${#HAPIDS[@]})) && last="${HAPIDS[${#HAPIDS[@]}-1]}"
  if [[ -n "$last" ]]; then
    pin_exec "$PROXY_CPU" haproxy -f "$HCFG" "$@" -sf "$last" >>"$RUN_DIR/haproxy/haproxy.log" 2>&1 &
  else
    pin_exec "$PROXY_CPU" haproxy -f "$HCFG" >>"$RUN_DIR/haproxy/haproxy.log" 2>&1 &
  fi
  HAPIDS+=("$!"); track "$!"
}

do_reload() {
  case "$MODE" in
    nginx_reload) nginx_reload ;;
    haproxy_sf) haproxy_spawn ;;
    haproxy_sf_x) haproxy_spawn -x "$RUN_DIR/haproxy/admin.sock" ;;
  esac
}

rollcall_started=0
start_proxy() {
  case "$MODE" in
    rollcall)
      if ((rollcall_started == 0)); then
        start_nats; start_discovery; start_balancer "$PROXY_CPU" web; rollcall_started=1
      fi
      # The churn runs a little longer than wrk, so the whole load sees it.
      start_fleet "" web "${ADDRS[0]}" "${ADDRS[1]}" --churn "${ADDRS[2]}" --every "$(python3 -c "print(int($INTERVAL*1000))")ms" --for "$((DUR + 2))s"
      wait_rotation "http://127.0.0.1:$ROLLCALL_PORT/" 2
      PURL="http://127.0.0.1:$ROLLCALL_PORT/" ;;
    nginx_*) write_nginx_upstreams "${BACKEND_PORTS[@]}"; start_nginx "$PROXY_CPU"; PURL="http://127.0.0.1:$NGINX_PORT/" ;;
    haproxy_*) HAPIDS=(); render 3; haproxy_spawn; wait_port "$HAPROXY_PORT"; PURL="http://127.0.0.1:$HAPROXY_PORT/" ;;
  esac
}

stop_proxy() {
  local p
  case "$MODE" in
    rollcall) stop_pid "$FLEET_PID" ;;
    nginx_*) stop_pid "$NGINX_PID" ;;
    haproxy_*) for p in "${HAPIDS[@]}"; do stop_pid "$p"; done; HAPIDS=() ;;
  esac
  sleep 0.5
}

for ((rep=1; rep<=REPS; rep++)); do
for MODE in $MODES; do
  start_proxy
  changes_before=0
  [[ "$MODE" == rollcall ]] && changes_before="$(grep -c 'web-19003' "$DISCOVERY_LOG" || true)"
  run_wrk "$MODE" "$PURL" "$DUR" "$CONNS" "${WRK_EXTRA[@]}" > "$RUN_DIR/line-$MODE" &
  wpid=$!; track "$wpid"
  changes=0; fails=0
  if [[ "$MODE" != rollcall ]]; then
    end=$(( $(date +%s%N) + DUR * 1000000000 - 300000000 ))
    sleep 0.3
    while kill -0 "$wpid" 2>/dev/null && (( $(date +%s%N) < end )); do
      if ((changes % 2 == 0)); then render 2; else render 3; fi
      do_reload || fails=$((fails+1))
      changes=$((changes+1))
      sleep "$INTERVAL"
    done
  fi
  wait "$wpid" || true
  if [[ "$MODE" == rollcall ]]; then
    # Membership changes discovery really made for backend 3 during the run.
    changes=$(( $(grep -c 'web-19003' "$DISCOVERY_LOG" || true) - changes_before ))
  fi
  line="$(cat "$RUN_DIR/line-$MODE")"
  python3 - "$MODE" "$changes" "$line" "$fails" "$CONN_MODE" "$rep" "$INTERVAL" <<'PY' | tee -a "$RUN_DIR/churn-results.txt"
import sys
mode, changes, line, fails, cm, rep, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
d = {a: b for a, b in (x.split("=", 1) for x in line.split() if "=" in x)}
sock = sum(int(d[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout"))
non2xx = int(d["non2xx"]); tot = sock + non2xx
print(f"CHURN figure=churn mode={mode} conn={cm} rep={rep} interval_s={interval} changes={changes} change_failures={fails} "
      f"requests={d['requests']} rps={float(d['rps']):.0f} p50_us={d['p50_us']} p99_us={d['p99_us']} max_us={d['max_us']} "
      f"err_connect={d['err_connect']} err_read={d['err_read']} err_write={d['err_write']} err_timeout={d['err_timeout']} "
      f"non2xx={non2xx} errors_total={tot}")
PY
  stop_proxy
done
done

python3 - "$RUN_DIR/churn-results.txt" <<'PY'
import sys, statistics as st
rows = [dict(x.split("=", 1) for x in l.split()[1:] if "=" in x) for l in open(sys.argv[1]) if l.startswith("CHURN ")]
def mmm(v):
    return f"{st.median(v):.0f} [{min(v):.0f}..{max(v):.0f}]"
for mode in dict.fromkeys(r["mode"] for r in rows):
    rs = [r for r in rows if r["mode"] == mode]
    print(f"CHURN_SUMMARY figure=churn mode={mode} conn={rs[0]['conn']} n={len(rs)} changes={mmm([int(r['changes']) for r in rs])} "
          f"errors_total={mmm([int(r['errors_total']) for r in rs])} rps={mmm([float(r['rps']) for r in rs])} "
          f"p99_us={mmm([int(r['p99_us']) for r in rs])}")
PY

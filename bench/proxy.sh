#!/usr/bin/env bash
# Proxy throughput and latency, side by side in one run: direct to one backend,
# rollcall, nginx round-robin and HAProxy roundrobin over the same three
# backends, keep-alive on both sides everywhere.
#
# rollcall runs as it does in production: nats-server, `rollcall discovery`,
# `rollcall balancer --listen 127.0.0.1:18083 web`, the three backends
# registered over NATS (bench_fleet heartbeats them). wrk runs REPS times per
# target, the order rotated every rep, all pinned alike (LAYOUT, default
# w0_p1_b01: wrk on CPU 0, every proxy on CPU 1, backends on 0-1; two_core:
# every proxy on both cores with two threads (rollcall --workers 2, nginx
# worker_processes 2, HAProxy nbthread 2), wrk and the backends sharing them).
# LAYOUTS="w0_p1_b01 two_core" measures both in one run, one after the other.
#
# Prints one RUN line per wrk run, one SUMMARY line per target (req/s, p50,
# p99, and the proxy process's own CPU per request, user and system, from
# /proc/PID/stat of it and its children; and the TCP segments the whole
# machine sent per request, from /proc/net/snmp: median [min..max]) and RATIO lines
# (per-rep rollcall/nginx and rollcall/haproxy req/s, and the p99 ratios).
#
# rollcall is the profile-guided build of scripts/build-pgo.sh (PGO=0: the
# plain release build).
#
# Env: LAYOUTS (or LAYOUT), REPS (3), DUR seconds per wrk run (5), CONNS (50), THREADS (1), WARMUP (1),
#      PGO (1)
source "$(dirname "$0")/lib.sh"
PGO="${PGO:-1}"

LAYOUTS="${LAYOUTS:-${LAYOUT:-w0_p1_b01}}"; REPS="${REPS:-3}"; DUR="${DUR:-5}"; CONNS="${CONNS:-50}"; WARMUP="${WARMUP:-1}"
for LAYOUT in $LAYOUTS; do set_layout; done  # an unknown layout stops the run here
ensure_packages nginx haproxy wrk curl
ensure_nats
build_rollcall bench_fleet
versions
log "layouts=$LAYOUTS reps=$REPS dur=${DUR}s conns=$CONNS threads=${THREADS:-1}"

# The backends run on both cores in every layout, and the NATS side is idle
# during the runs (a heartbeat a second): both stay up across layouts.
LAYOUT=w0_p1_b01; set_layout
start_backends "$BACKEND_CPU"
start_nats
start_discovery
start_fleet "" web "${BACKEND_PORTS[@]/#/127.0.0.1:}"

declare -A URL=(
  [direct]="http://127.0.0.1:${BACKEND_PORTS[0]}/"
  [nginx]="http://127.0.0.1:$NGINX_PORT/"
  [haproxy]="http://127.0.0.1:$HAPROXY_PORT/"
  [rollcall]="http://127.0.0.1:$ROLLCALL_PORT/"
)
TARGETS=(direct rollcall nginx haproxy)
# proxy_ticks PID...: user and system clock ticks of these processes and
# their children (nginx's workers under its master)
proxy_ticks() {
  local p pids=("$@") user=0 sys=0 u s
  for p in "$@"; do mapfile -t -O "${#pids[@]}" pids < <(pgrep -P "$p"); done
  for p in "${pids[@]}"; do
    read -r u s < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}') || continue
    user=$((user + u)); sys=$((sys + s))
  done
  echo "$user $sys"
}
# tcp_out_segs: TCP segments sent by the whole machine so far
tcp_out_segs() {
  awk '/^Tcp:/ { if (!col) { for (i = 1; i <= NF; i++) if ($i == "OutSegs") col = i } else { print $col; exit } }' /proc/net/snmp
}
NT=${#TARGETS[@]}
RES="$RUN_DIR/results.tsv"
RSS="$RUN_DIR/rss.tsv"

for LAYOUT in $LAYOUTS; do
  set_layout
  log "layout=$LAYOUT wrk_cpu=${WRK_CPU:-any} proxy_cpu=${PROXY_CPU:-any} backend_cpu=${BACKEND_CPU:-any} proxy_threads=$PROXY_THREADS"
  start_nginx "$PROXY_CPU"
  start_haproxy "$PROXY_CPU"
  start_balancer "$PROXY_CPU" web
  for t in rollcall nginx haproxy; do wait_rotation "${URL[$t]}" 3; done
  log "every proxy rotates over the 3 backends"
  for t in "${TARGETS[@]}"; do run_wrk "warm-$t" "${URL[$t]}" "$WARMUP" "$CONNS" >/dev/null; done
  for ((rep=1; rep<=REPS; rep++)); do
    for ((k=0; k<NT; k++)); do
      t="${TARGETS[$(( (k + rep - 1) % NT ))]}"
      case "$t" in
        rollcall) pids=("$BALANCER_PID") ;; nginx) pids=("$NGINX_PID") ;;
        haproxy) pids=("$HAPROXY_PID") ;; *) pids=() ;;
      esac
      read -r u0 s0 < <(proxy_ticks "${pids[@]}")
      g0="$(tcp_out_segs)"
      line="$(run_wrk "$t" "${URL[$t]}" "$DUR" "$CONNS")"
      g1="$(tcp_out_segs)"
      read -r u1 s1 < <(proxy_ticks "${pids[@]}")
      line+=" proxy_user_ticks=$((u1 - u0)) proxy_sys_ticks=$((s1 - s0)) ticks_per_s=$(getconf CLK_TCK)"
      line+=" tcp_segments=$((g1 - g0))"
      echo "RUN layout=$LAYOUT rep=$rep target=$t $line"
      printf '%s\t%s\t%s\t%s\n' "$LAYOUT" "$rep" "$t" "$line" >> "$RES"
    done
  done
  printf '%s\t%s\n' "$LAYOUT" "$(awk '/^VmRSS:/{print $2}' "/proc/$BALANCER_PID/status")" >> "$RSS"
  stop_pid "$BALANCER_PID"; stop_pid "$HAPROXY_PID"; stop_pid "$NGINX_PID"
done


python3 - "$RES" "$RSS" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
rss_of = {layout: int(kib) for layout, kib in (l.split() for l in open(sys.argv[2]))}
def kv(s):
    return {a: b for a, b in (x.split("=", 1) for x in s.split() if "=" in x)}
by_layout = {}
for layout, rep, t, line in rows:
    by_layout.setdefault(layout, {}).setdefault(t, {})[int(rep)] = kv(line)
def mmm(v, f="{:.6g}"):
    return f"{f.format(st.median(v))} [{f.format(min(v))}..{f.format(max(v))}]"
def ratio(data, layout, a, b, key, label):
    reps = sorted(set(data[a]) & set(data[b]))
    r = [float(data[a][i][key]) / float(data[b][i][key]) for i in reps]
    print(f"RATIO figure=proxy layout={layout} {a}/{b} {label}={st.median(r):.3f} [{min(r):.3f}..{max(r):.3f}]")
for layout, data in by_layout.items():
    for t in ("direct", "rollcall", "nginx", "haproxy"):
        runs = data[t].values()
        rps = [float(r["rps"]) for r in runs]
        p50 = [int(r["p50_us"]) for r in runs]
        p99 = [int(r["p99_us"]) for r in runs]
        errs = sum(int(r[k]) for r in runs for k in ("err_connect", "err_read", "err_write", "err_timeout", "non2xx"))
        segments = [int(r["tcp_segments"]) / int(r["requests"]) for r in runs]
        extra = f" tcp_segments_per_req={mmm(segments, '{:.2f}')}"
        if t == "rollcall":
            extra += f" balancer_rss_mib={rss_of[layout]/1024:.1f}"
        if t != "direct":
            # The proxy's own CPU per request, in microseconds.
            per = lambda r, k: 1e6 * int(r[k]) / int(r["ticks_per_s"]) / int(r["requests"])
            user = [per(r, "proxy_user_ticks") for r in runs]
            system = [per(r, "proxy_sys_ticks") for r in runs]
            extra += f" user_us_per_req={mmm(user, '{:.2f}')} sys_us_per_req={mmm(system, '{:.2f}')}"
        print(f"SUMMARY figure=proxy layout={layout} target={t} n={len(rps)} rps={mmm(rps, '{:.0f}')} "
              f"p50_us={mmm(p50, '{:.0f}')} p99_us={mmm(p99, '{:.0f}')} errors_total={errs}{extra}")
    for other in ("nginx", "haproxy", "direct"):
        ratio(data, layout, "rollcall", other, "rps", "rps_ratio")
    for other in ("nginx", "haproxy"):
        ratio(data, layout, "rollcall", other, "p99_us", "p99_ratio")
PY

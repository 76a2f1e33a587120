# Shared helpers for the bench/ scripts. Source it; do not run it.
# Adapted from the bench anchors' lib.sh: every process started through these
# helpers has its PID recorded and is stopped by PID (never by name) in the
# EXIT trap; scratch files go to a temporary directory removed at exit
# (KEEP_RUN_DIR=1 keeps it: configs, logs, raw wrk output).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
ROLLCALL_BIN="$TARGET_DIR/release/rollcall"
EXAMPLES_DIR="$TARGET_DIR/release/examples"
BACKEND_BIN="${BACKEND_BIN:-$BENCH_DIR/backend/target/release/backend}"
WRK_LUA="$BENCH_DIR/wrk_report.lua"
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/rollcall-bench.XXXXXX")"
KEEP_RUN_DIR="${KEEP_RUN_DIR:-0}"
# Ports away from the anchors' (9001-9003, 8081-8083, 4333) and from the
# 4222/8222 defaults, so a bench can run beside either.
BACKEND_PORTS=(${BACKEND_PORTS_LIST:-19001 19002 19003})
NGINX_PORT="${NGINX_PORT:-18081}"
HAPROXY_PORT="${HAPROXY_PORT:-18082}"
ROLLCALL_PORT="${ROLLCALL_PORT:-18083}"
ROLLCALL_ADMIN_PORT="${ROLLCALL_ADMIN_PORT:-18084}"
NATS_PORT="${NATS_PORT:-14222}"
NATS_MON_PORT="${NATS_MON_PORT:-18222}"
NATS_URL_BENCH="nats://127.0.0.1:$NATS_PORT"
PIDS=()

log() { echo "# $*" >&2; }

track() { PIDS+=("$1"); }

stop_pid() {  # stop_pid PID [SIGNAL]: signal, wait up to 5 s, then SIGKILL
  local pid="$1" sig="${2:-TERM}" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}"; done
  if [[ "$KEEP_RUN_DIR" == 1 ]]; then log "run dir kept: $RUN_DIR"; else rm -rf "$RUN_DIR"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pin() { local c="$1"; shift; if [[ -n "$c" ]]; then taskset -c "$c" "$@"; else "$@"; fi; }
# pin_exec CPULIST cmd... : exec'ing variant, use as `pin_exec ... &` so that $! is the real PID
pin_exec() { local c="$1"; shift; if [[ -n "$c" ]]; then exec taskset -c "$c" "$@"; else exec "$@"; fi; }

wait_port() {  # wait_port PORT [timeout_s]
  local port="$1" t="${2:-10}" i
  for ((i=0; i<t*20; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $port did not open" >&2; return 1
}

assert_port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then echo "port $1 already in use" >&2; exit 3; fi
}

# CPU layouts (the anchors' names): where wrk, the proxies and the backends run,
# and how many threads each proxy serves with (PROXY_THREADS: rollcall
# --workers, nginx worker_processes, HAProxy nbthread). two_core: every proxy
# on both cores with two threads, wrk and the backends sharing the cores.
set_layout() {
  PROXY_THREADS=1
  case "${LAYOUT:-w0_p1_b01}" in
    none)      WRK_CPU="";  PROXY_CPU="";  BACKEND_CPU="" ;;
    w0_p1_b1)  WRK_CPU="0"; PROXY_CPU="1"; BACKEND_CPU="1" ;;
    w0_p1_b0)  WRK_CPU="0"; PROXY_CPU="1"; BACKEND_CPU="0" ;;
    w0_p1_b01) WRK_CPU="0"; PROXY_CPU="1"; BACKEND_CPU="0-1" ;;
    w0_only)   WRK_CPU="0"; PROXY_CPU="";  BACKEND_CPU="" ;;
    two_core)  WRK_CPU="0-1"; PROXY_CPU="0-1"; BACKEND_CPU="0-1"; PROXY_THREADS=2 ;;
    *) echo "unknown LAYOUT=$LAYOUT" >&2; exit 2 ;;
  esac
}

# --- provisioning -----------------------------------------------------------

ensure_packages() {  # ensure_packages CMD... : apt-get install the Debian packages of missing commands
  local missing=() c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]} (apt-get) ..."
  local apt=(apt-get); [[ $(id -u) == 0 ]] || apt=(sudo apt-get)
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet.
  "${apt[@]}" install -y "${missing[@]}" >&2 ||
    { "${apt[@]}" update >&2 && "${apt[@]}" install -y "${missing[@]}" >&2; }
}

ensure_nats() {  # nats-server (and nats-py) from the project's own provisioning
  # shellcheck source=/dev/null
  source "$ROOT/scripts/provision.sh" 2>/dev/null
  set -euo pipefail
}

ensure_backend() {
  if [[ ! -x "$BACKEND_BIN" ]]; then
    log "building the benchmark backend (cargo build --release) ..."
    (cd "$BENCH_DIR/backend" && cargo build --release -q) >&2
  fi
}

# build_rollcall [EXAMPLE...]: release build of the binary and the bench
# clients; with PGO=1, the profile-guided build of scripts/build-pgo.sh
# (target/pgo), and ROLLCALL_BIN and EXAMPLES_DIR point there. Sets
# ROLLCALL_BUILD (pgo or release) for the VERSIONS line.
build_rollcall() {
  local examples=() e
  for e in "$@"; do examples+=(--example "$e"); done
  if [[ "${PGO:-0}" == 1 ]]; then
    log "building rollcall with profile-guided optimization (scripts/build-pgo.sh ${examples[*]}) ..."
    bash "$ROOT/scripts/build-pgo.sh" "${examples[@]}" >&2
    ROLLCALL_BIN="$ROOT/target/pgo/release/rollcall"
    EXAMPLES_DIR="$ROOT/target/pgo/release/examples"
    ROLLCALL_BUILD=pgo
  else
    log "building rollcall in release mode (cargo build --release -q --bin rollcall ${examples[*]}) ..."
    (cd "$ROOT" && cargo build --release -q --bin rollcall "${examples[@]}") >&2
    ROLLCALL_BUILD=release
  fi
}

versions() {  # one VERSIONS line: what produced the numbers
  local nats="" rc
  [[ -n "${NATS_SERVER_BIN:-}" ]] && nats="$("$NATS_SERVER_BIN" --version 2>/dev/null | awk '{print $2}')"
  rc="$(rustc --version | awk '{print $2}')"
  echo "VERSIONS date=$(date -u +%Y-%m-%dT%H:%MZ) cpus=$(nproc) cpu=\"$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)\"" \
    "nginx=$(nginx -v 2>&1 | sed 's|.*/||') haproxy=$(haproxy -v 2>/dev/null | awk 'NR==1{print $3}')" \
    "wrk=$(wrk -v 2>&1 | awk 'NR==1{print $2}') nats-server=$nats rustc=$rc" \
    "rollcall=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "rollcall_build=${ROLLCALL_BUILD:-none}"
}

# --- processes -------------------------------------------------------------

start_backends() {  # start_backends CPULIST [PORT...]
  ensure_backend
  local cpu="$1" p n=0; shift
  local ports=("$@"); ((${#ports[@]})) || ports=("${BACKEND_PORTS[@]}")
  for p in "${ports[@]}"; do assert_port_free "$p"; done
  for p in "${ports[@]}"; do
    n=$((n+1))
    pin_exec "$cpu" "$BACKEND_BIN" "$p" "backend $p" &
    track $!
  done
  for p in "${ports[@]}"; do wait_port "$p"; done
}

start_nats() {  # start_nats [CPULIST]: JetStream on, fresh store in the run dir, monitoring port
  assert_port_free "$NATS_PORT"; assert_port_free "$NATS_MON_PORT"
  local store="$RUN_DIR/nats-store-$(date +%s%N)"
  local config=(); [[ -n "${NATS_CONFIG:-}" ]] && config=(-c "$NATS_CONFIG")  # e.g. the partition mapping
  pin_exec "${1:-}" "$NATS_SERVER_BIN" "${config[@]}" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON_PORT" -js -sd "$store" \
    -l "$RUN_DIR/nats-server.log" &
  NATS_PID=$!; track "$NATS_PID"
  wait_port "$NATS_PORT"
}

wait_log() {  # wait_log FILE PATTERN [timeout_s]
  local f="$1" pat="$2" t="${3:-15}" i
  for ((i=0; i<t*20; i++)); do grep -q "$pat" "$f" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$pat' in $f" >&2; tail -5 "$f" >&2; return 1
}

start_discovery() {  # start_discovery [CPULIST]  (sets DISCOVERY_PID)
  local logf="$RUN_DIR/discovery-$(date +%s%N).log"
  # shellcheck disable=SC2086  # DISCOVERY_ARGS: extra flags, word-split on purpose
  ROLLCALL_LOG="${ROLLCALL_LOG:-info}" pin_exec "${1:-}" "$ROLLCALL_BIN" discovery --nats "$NATS_URL_BENCH" ${DISCOVERY_ARGS:-} >"$logf" 2>&1 &
  DISCOVERY_PID=$!; DISCOVERY_LOG="$logf"; track "$DISCOVERY_PID"
  wait_log "$logf" "discovery started"
}

start_balancer() {  # start_balancer CPULIST ROUTE...  (sets BALANCER_PID)
  local cpu="$1"; shift
  assert_port_free "$ROLLCALL_PORT"; assert_port_free "$ROLLCALL_ADMIN_PORT"
  ROLLCALL_LOG="${ROLLCALL_LOG:-warn}" pin_exec "$cpu" "$ROLLCALL_BIN" balancer --nats "$NATS_URL_BENCH" \
    --listen "127.0.0.1:$ROLLCALL_PORT" --workers "${PROXY_THREADS:-1}" --admin "127.0.0.1:$ROLLCALL_ADMIN_PORT" "$@" >"$RUN_DIR/balancer.log" 2>&1 &
  BALANCER_PID=$!; track "$BALANCER_PID"
  wait_port "$ROLLCALL_PORT" 30
}

start_fleet() {  # start_fleet CPULIST SERVICE [bench_fleet args...] : announce backends over NATS
  local cpu="$1" service="$2"; shift 2
  pin_exec "$cpu" "$EXAMPLES_DIR/bench_fleet" --nats "$NATS_URL_BENCH" --service "$service" "$@" \
    >"$RUN_DIR/fleet-$service.out" 2>"$RUN_DIR/fleet-$service.log" &
  FLEET_PID=$!; track "$FLEET_PID"
}

distinct_answers() {  # distinct_answers URL N : how many different bodies N sequential requests got
  local i
  for ((i=0; i<$2; i++)); do curl -s -m 2 "$1"; done | sort -u | wc -l
}

wait_rotation() {  # wait_rotation URL N [timeout_s]: until N sequential requests reach N backends
  local url="$1" n="$2" t="${3:-15}" i
  for ((i=0; i<t*10; i++)); do
    [[ "$(distinct_answers "$url" "$n")" == "$n" ]] && return 0
    sleep 0.1
  done
  echo "$url did not rotate over $n backends within ${t}s" >&2; return 1
}

# --- nginx and HAProxy (as in the anchors) ----------------------------------

write_nginx_upstreams() {  # write_nginx_upstreams PORT... (atomic replace)
  local f="$RUN_DIR/nginx/upstreams.conf" p; mkdir -p "$RUN_DIR/nginx"
  { for p in "$@"; do echo "server 127.0.0.1:$p;"; done; } > "$f.tmp"
  mv -f "$f.tmp" "$f"
}

write_nginx_conf() {
  mkdir -p "$RUN_DIR/nginx/tmp"
  cat > "$RUN_DIR/nginx/nginx.conf" <<EOF
# nginx reverse proxy, round-robin over the backends, keep-alive to upstreams.
user root;
worker_processes ${PROXY_THREADS:-1};
daemon off;
master_process on;
pid $RUN_DIR/nginx/nginx.pid;
error_log $RUN_DIR/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  client_body_temp_path $RUN_DIR/nginx/tmp/body;
  proxy_temp_path       $RUN_DIR/nginx/tmp/proxy;
  fastcgi_temp_path     $RUN_DIR/nginx/tmp/fastcgi;
  uwsgi_temp_path       $RUN_DIR/nginx/tmp/uwsgi;
  scgi_temp_path        $RUN_DIR/nginx/tmp/scgi;
  upstream backends {
    include $RUN_DIR/nginx/upstreams.conf;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
}

start_nginx() {  # start_nginx CPULIST  (sets NGINX_PID = master pid)
  assert_port_free "$NGINX_PORT"
  write_nginx_conf
  [[ -f "$RUN_DIR/nginx/upstreams.conf" ]] || write_nginx_upstreams "${BACKEND_PORTS[@]}"
  pin_exec "$1" nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx" -c "$RUN_DIR/nginx/nginx.conf" &
  NGINX_PID=$!; track "$NGINX_PID"
  wait_port "$NGINX_PORT"
}

nginx_reload() {  # the consul-template way: nginx -s reload
  nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx" -c "$RUN_DIR/nginx/nginx.conf" -s reload 2>>"$RUN_DIR/nginx/reload.log"
}

write_haproxy_cfg() {  # write_haproxy_cfg FILE PORT... (atomic replace)
  local f="$1" p i=0; shift
  mkdir -p "$(dirname "$f")"
  {
    cat <<EOF
# HAProxy round-robin over the backends, HTTP mode, keep-alive both sides.
global
    nbthread ${PROXY_THREADS:-1}
    maxconn 4096
    stats socket $RUN_DIR/haproxy/admin.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend be
backend be
    balance roundrobin
EOF
    for p in "$@"; do i=$((i+1)); echo "    server b$i 127.0.0.1:$p"; done
  } > "$f.tmp"
  mv -f "$f.tmp" "$f"
}

start_haproxy() {  # start_haproxy CPULIST  (sets HAPROXY_PID)
  assert_port_free "$HAPROXY_PORT"
  write_haproxy_cfg "$RUN_DIR/haproxy/haproxy.cfg" "${BACKEND_PORTS[@]}"
  pin_exec "$1" haproxy -f "$RUN_DIR/haproxy/haproxy.cfg" >>"$RUN_DIR/haproxy/haproxy.log" 2>&1 &
  HAPROXY_PID=$!; track "$HAPROXY_PID"
  wait_port "$HAPROXY_PORT"
}

# --- load ---------------------------------------------------------------------

cpu_snapshot() { awk '/^cpu[0-9]+ /{busy=$2+$3+$4+$7+$8; tot=busy+$5+$6; printf "%s %d %d\n",$1,busy,tot}' /proc/stat; }

# run_wrk LABEL URL DURATION_S CONNS [extra wrk args...]
# Prints the WRKRESULT fields (wrk_report.lua) plus per-CPU busy% during the run.
run_wrk() {
  local label="$1" url="$2" dur="$3" conns="$4"; shift 4
  local out="$RUN_DIR/wrk-$label-$(date +%s%N).txt" before after
  before="$(cpu_snapshot)"
  pin "${WRK_CPU:-}" wrk -t"${THREADS:-1}" -c"$conns" -d"${dur}s" --timeout 2s --latency -s "$WRK_LUA" "$@" "$url" > "$out" 2>&1 || true
  after="$(cpu_snapshot)"
  local cpus
  cpus="$(paste -d' ' <(echo "$before") <(echo "$after") | awk '{b=$5-$2; t=$6-$3; printf "%s_busy=%.0f%% ", $1, (t>0?100*b/t:0)}')"
  local res; res="$(grep '^WRKRESULT' "$out" || echo 'WRKRESULT failed=1')"
  echo "${res#WRKRESULT } $cpus"
}

# kv KEY "line": the value of key=value in a result line
kv() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

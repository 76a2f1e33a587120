#!/usr/bin/env bash
# A profile-guided release build of rollcall: the build to run balancers
# from when proxy throughput matters.
#
#   scripts/build-pgo.sh [--example NAME ...]
#
# 1. builds rollcall with instrumentation (-Cprofile-generate) into
#    target/pgo-train;
# 2. runs it on a training load on 127.0.0.1: nats-server, `rollcall
#    discovery`, three bench backends announced over NATS with a fourth
#    joining and leaving every 50 ms, `rollcall balancer` proxying keep-alive
#    requests from wrk on 50 connections (scripts/pgo-load.lua: GETs and
#    POSTs with sized and chunked bodies) and h2c requests, then discovery
#    folding a simulated fleet of 10,000 instances heartbeating at
#    100,000/s (examples/bench_discovery_load.rs); then stops each process
#    with SIGTERM, so it writes its profile as it exits;
# 3. merges the profiles (llvm-profdata from rustup's llvm-tools, added if
#    missing) into target/pgo/rollcall-<hash>.profdata;
# 4. builds rollcall (and the examples named) with that profile
#    (-Cprofile-use): target/pgo/release/rollcall.
#
# The profile tells the compiler which branches and functions the hot path
# takes, so it lays that code out together and inlines along it: on the
# bench machine a proxied request then misses the instruction cache a third
# as often (bench/README.md). Code the load does not reach (the agent, the
# operator commands, error paths) is compiled as cold: smaller, not slower to
# any degree that matters for what it does.
#
# Fails, and builds nothing, if any training request fails.
# Env: TRAIN_SECONDS (5, of wrk's load), CARGO_TARGET_DIR is ignored
# (the two builds have directories of their own under target/).
source "$(dirname "$0")/../bench/lib.sh"
unset CARGO_TARGET_DIR

TRAIN_SECONDS="${TRAIN_SECONDS:-5}"
TRAIN_DIR="$ROOT/target/pgo-train"
PGO_DIR="$ROOT/target/pgo"
# A fixed path: it is part of the instrumented build's flags, and a new one
# would rebuild every crate.
PROFILES="$TRAIN_DIR/profiles"

host="$(rustc -vV | sed -n 's/^host: //p')"
profdata_tool="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x "$profdata_tool" ]]; then
  log "adding rustup's llvm-tools (llvm-profdata) ..."
  rustup component add llvm-tools >&2
fi
ensure_packages curl wrk
ensure_nats

log "building the instrumented rollcall into $TRAIN_DIR ..."
(cd "$ROOT" && CARGO_TARGET_DIR="$TRAIN_DIR" RUSTFLAGS="-Cprofile-generate=$PROFILES" \
  cargo build --release --locked -q --bin rollcall --example bench_fleet --example bench_discovery_load) >&2
rm -rf "$PROFILES"
ROLLCALL_BIN="$TRAIN_DIR/release/rollcall"
EXAMPLES_DIR="$TRAIN_DIR/release/examples"

log "training: discovery, a churning fleet and a balancer under load ..."
start_backends "" "${BACKEND_PORTS[@]}" 19004
start_nats
start_discovery
addrs=("${BACKEND_PORTS[@]/#/127.0.0.1:}")
start_fleet "" web "${addrs[@]}" --churn 127.0.0.1:19004 --every 50ms --for 600s
start_balancer "" web
wait_rotation "http://127.0.0.1:$ROLLCALL_PORT/" 3 30
trained="$(wrk -t1 -c50 -d"${TRAIN_SECONDS}s" -s "$ROOT/scripts/pgo-load.lua" "http://127.0.0.1:$ROLLCALL_PORT/" | grep '^TRAINED')"
log "HTTP/1.1: $trained"
[[ "$trained" == *" errors=0 non2xx=0" ]] || { echo "training requests failed: $trained" >&2; exit 1; }
# One request per curl: this curl (7.88) does not send a second request on
# a reused h2c connection.
h2c="$(for i in $(seq 200); do
  curl -s --http2-prior-knowledge -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$ROLLCALL_PORT/h2c/$i" || true
done | sort | uniq -c)"
log "h2c answers: $(echo $h2c)"
[[ "$h2c" =~ ^\ *200\ 200$ ]] || { echo "training h2c requests failed: $h2c" >&2; exit 1; }
"$ROLLCALL_BIN" catalog --nats "$NATS_URL_BENCH" >"$RUN_DIR/catalog.out" 2>&1 \
  || { cat "$RUN_DIR/catalog.out" >&2; echo "training: rollcall catalog failed" >&2; exit 1; }
# Discovery's own hot path: a fleet of 10,000 instances joining, then
# heartbeating at 100,000/s (the balancer's load above brings it only a few
# heartbeats a second).
fleet="$("$EXAMPLES_DIR/bench_discovery_load" --nats "$NATS_URL_BENCH" --discovery-pid "$DISCOVERY_PID" \
  --instances 10000 --services 100 --rate 100000 --duration "${TRAIN_SECONDS}s")"
log "discovery: $fleet"
[[ "$fleet" == *" live_after=10000 "* ]] || { echo "training: the simulated fleet did not stay live: $fleet" >&2; exit 1; }
for pid in "$FLEET_PID" "$BALANCER_PID" "$DISCOVERY_PID"; do stop_pid "$pid" TERM; done

mkdir -p "$PGO_DIR"
"$profdata_tool" merge -o "$PGO_DIR/merged.profdata" "$PROFILES"
# Named by its content: cargo does not look into the file, so the flags
# themselves must change with it for the build to use a new profile.
PROFDATA="$PGO_DIR/rollcall-$(sha256sum "$PGO_DIR/merged.profdata" | cut -c1-16).profdata"
rm -f "$PGO_DIR"/rollcall-*.profdata
mv "$PGO_DIR/merged.profdata" "$PROFDATA"
log "profile: $PROFDATA ($(du -h "$PROFDATA" | cut -f1))"

log "building rollcall with the profile into $PGO_DIR ..."
# Every crate is built anew for a new profile: the last build's outputs
# would only pile up.
rm -rf "$PGO_DIR/release"
(cd "$ROOT" && CARGO_TARGET_DIR="$PGO_DIR" RUSTFLAGS="-Cprofile-use=$PROFDATA" \
  cargo build --release --locked -q --bin rollcall "$@") >&2
log "built $PGO_DIR/release/rollcall ($("$PGO_DIR/release/rollcall" --version))"

#!/usr/bin/env bash
# Discovery fail-over: three `rollcall discovery` replicas on one nats-server,
# a `rollcall balancer`, three HTTP backends heartbeating (TTL 1.5 s) and one
# more instance joining and leaving every 50 ms (so every leader has something
# to write at once). KILLS times: kill -9 the leader, measure until the first
# snapshot stored by the new leader reaches a subscriber (its stream sequence
# is above the new epoch), start the killed replica again.
#
# Prints FAILOVER lines per kill and a FAILOVER_SUMMARY: kill -> first
# snapshot from the new leader p50/p99/max, shrunken snapshots (one missing a
# heartbeating instance), revision regressions (per subject), failed client
# requests through the balancer.
#
# Env: KILLS (20), FAILOVER_BIN (target/debug/rollcall: the timers, not the
#      code's speed, set the figures), ROLLCALL_PYTHON (python with nats-py).
source "$(dirname "$0")/lib.sh"

KILLS="${KILLS:-20}"
# lib.sh points ROLLCALL_BIN at the release build; the timers, not the
# code's speed, set these figures, so a debug build does.
ROLLCALL_BIN="${FAILOVER_BIN:-$TARGET_DIR/debug/rollcall}"
PYTHON="${ROLLCALL_PYTHON:-python3}"
NATS_BIN="${NATS_SERVER_BIN:-nats-server}"
[[ -x "$ROLLCALL_BIN" ]] || (cd "$ROOT" && cargo build --bin rollcall)

"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$RUN_DIR/js" >"$RUN_DIR/nats.log" 2>&1 &
track $!
wait_port "$NATS_PORT"
for i in 0 1 2; do
  "$PYTHON" -m http.server --bind 127.0.0.1 "${BACKEND_PORTS[$i]}" --directory "$RUN_DIR" \
    >"$RUN_DIR/backend$i.log" 2>&1 &
  track $!
done
for port in "${BACKEND_PORTS[@]}"; do wait_port "$port"; done
"$ROLLCALL_BIN" balancer --nats "$NATS_URL_BENCH" --listen "127.0.0.1:$ROLLCALL_PORT" web \
  >"$RUN_DIR/balancer.log" 2>&1 &
track $!
wait_port "$ROLLCALL_PORT"
log "kills=$KILLS rollcall=$ROLLCALL_BIN nats=$("$NATS_BIN" --version)"

KILLS="$KILLS" ROLLCALL_BIN="$ROLLCALL_BIN" NATS_URL="$NATS_URL_BENCH" RUN_DIR="$RUN_DIR" \
  BALANCER="127.0.0.1:$ROLLCALL_PORT" PORTS="${BACKEND_PORTS[*]}" PYTHONPATH="$BENCH_DIR" "$PYTHON" - <<'EOF'
import asyncio, json, os, signal, subprocess, time, urllib.request
import nats
from failover_common import Assembler, Requests, churn, heartbeats, invariants, percentiles, record

KILLS = int(os.environ["KILLS"]); BIN = os.environ["ROLLCALL_BIN"]; URL = os.environ["NATS_URL"]
PORTS = [int(p) for p in os.environ["PORTS"].split()]; RUN_DIR = os.environ["RUN_DIR"]
replicas = {}

def spawn(name):
    log = open(f"{RUN_DIR}/{name}.log", "a")
    replicas[name] = subprocess.Popen([BIN, "discovery", "--nats", URL, "--replica", name],
                                      stdout=log, stderr=log)

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception:
        return None

async def main():
    nc = await nats.connect(URL)
    snapshots, leaders = [], []
    records = Assembler()
    async def on_snapshot(m):
        subject, s = records.take(json.loads(m.data))
        snapshots.append((time.monotonic(), int(m.headers.get("Nats-Sequence", 0)), subject, s))
    async def on_leader(m):
        leaders.append(json.loads(m.data))
    await nc.subscribe("rollcall.catalog.>", cb=on_snapshot)
    await nc.subscribe("rollcall.discovery.leader", cb=on_leader)
    for name in ("d0", "d1", "d2"):
        spawn(name)
    stable = [record(i, p) for i, p in enumerate(PORTS)]
    tasks = [asyncio.create_task(heartbeats(nc, stable)), asyncio.create_task(churn(nc, PORTS[0]))]
    while not any(len(s[3]["instances"]) >= 3 for s in snapshots):  # all three joined
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    load = Requests(get, f"http://{os.environ['BALANCER']}/")
    gaps = []
    for k in range(KILLS):
        old = leaders[-1]
        replicas[old["replica"]].send_signal(signal.SIGKILL)
        replicas[old["replica"]].wait()
        killed = time.monotonic()
        gap = None
        while time.monotonic() - killed < 10:
            await asyncio.sleep(0.01)
            new = [l for l in leaders if l["epoch"] > old["epoch"]]
            if not new:
                continue
            epoch = new[0]["epoch"]
            after = [t for t, seq, _, _ in snapshots if seq > epoch and t > killed]
            if after:
                gap = after[0] - killed
                break
        gaps.append(gap if gap is not None else float("inf"))
        print(f"FAILOVER kill={k+1} old={old['replica']}@{old['epoch']} new={new[0]['replica'] if new else '-'} "
              f"first_snapshot_ms={gap*1000 if gap is not None else -1:.0f}", flush=True)
        spawn(old["replica"])
        await asyncio.sleep(1.5)
    load.stop()
    for t in tasks: t.cancel()
    shrunken, regressions = invariants([(subject, s) for _, _, subject, s in snapshots],
                                       {r["id"] for r in stable})
    print(f"FAILOVER_SUMMARY kills={KILLS} {percentiles(gaps)} "
          f"snapshots={len(snapshots)} shrunken={shrunken} "
          f"revision_regressions={regressions} requests={load.served} failed_requests={load.failed}", flush=True)
    for p in replicas.values():
        p.send_signal(signal.SIGTERM)
    for p in replicas.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    await nc.close()

asyncio.run(main())
EOF

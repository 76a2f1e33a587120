#!/usr/bin/env bash
# The stream-leader gap: a three-node nats-server cluster (nats/cluster/, on
# ports 1423N client, 1623N route, 1823N monitor), three `rollcall discovery`
# replicas (each preferring its own node; the catalog stream is created with
# 3 copies), a `rollcall balancer`, three HTTP backends heartbeating (TTL
# 1.5 s) and one more instance joining and leaving every 50 ms. KILLS times:
# find the node leading the catalog stream's raft group
# ($JS.API.STREAM.INFO.ROLLCALL_CATALOG, cluster.leader), kill -9 it, and
# measure until the next snapshot is stored (reaches a subscriber) and until
# the balancer routes on it (its /catalog revision moves); then start the node
# again and wait until every copy of the stream is current.
#
# The churn pauses 300 ms before each kill, so no snapshot stored before the
# kill can be taken for one stored after it.
#
# Prints STREAM_FAILOVER lines per kill and a STREAM_FAILOVER_SUMMARY: kill ->
# next stored snapshot, and kill -> balancer routes on it (apart: kills of
# another node, and kills of the node the balancer was connected to, which
# re-reads the stream after reconnecting), p50/p99/max; shrunken snapshots,
# revision regressions, failed client requests.
#
# Env: KILLS (20), FAILOVER_BIN (target/debug/rollcall: the timers, not the
#      code's speed, set the figures), ROLLCALL_PYTHON (python with nats-py),
#      NATS_SERVER_BIN.
source "$(dirname "$0")/lib.sh"

KILLS="${KILLS:-20}"
ROLLCALL_BIN="${FAILOVER_BIN:-$TARGET_DIR/debug/rollcall}"
PYTHON="${ROLLCALL_PYTHON:-python3}"
NATS_BIN="${NATS_SERVER_BIN:-nats-server}"
[[ -x "$ROLLCALL_BIN" ]] || (cd "$ROOT" && cargo build --bin rollcall)

# The shipped node configs with every port moved off the defaults and the
# store in the run dir.
URLS=()
for n in 1 2 3; do
  for port in "1423$n" "1623$n" "1823$n"; do assert_port_free "$port"; done
  sed -e 's/127\.0\.0\.1:422\([123]\)/127.0.0.1:1423\1/g' \
      -e 's/127\.0\.0\.1:622\([123]\)/127.0.0.1:1623\1/g' \
      -e 's/127\.0\.0\.1:822\([123]\)/127.0.0.1:1823\1/g' \
      -e "s|store_dir:.*|store_dir: \"$RUN_DIR/node-$n\"|" \
      "$ROOT/nats/cluster/node-$n.conf" >"$RUN_DIR/node-$n.conf"
  URLS+=("nats://127.0.0.1:1423$n")
done
for i in 0 1 2; do
  "$PYTHON" -m http.server --bind 127.0.0.1 "${BACKEND_PORTS[$i]}" --directory "$RUN_DIR" \
    >"$RUN_DIR/backend$i.log" 2>&1 &
  track $!
done
for port in "${BACKEND_PORTS[@]}"; do wait_port "$port"; done
log "kills=$KILLS rollcall=$ROLLCALL_BIN nats=$("$NATS_BIN" --version)"

KILLS="$KILLS" ROLLCALL_BIN="$ROLLCALL_BIN" NATS_BIN="$NATS_BIN" URLS="${URLS[*]}" \
  RUN_DIR="$RUN_DIR" BALANCER="127.0.0.1:$ROLLCALL_PORT" ADMIN="127.0.0.1:$ROLLCALL_ADMIN_PORT" \
  PORTS="${BACKEND_PORTS[*]}" PYTHONPATH="$BENCH_DIR" "$PYTHON" - <<'EOF'
import asyncio, json, os, signal, subprocess, time, urllib.request
import nats
from failover_common import Assembler, Requests, churn, heartbeats, invariants, percentiles, record

KILLS = int(os.environ["KILLS"]); BIN = os.environ["ROLLCALL_BIN"]; RUN_DIR = os.environ["RUN_DIR"]
URLS = os.environ["URLS"].split(); PORTS = [int(p) for p in os.environ["PORTS"].split()]
BALANCER, ADMIN = os.environ["BALANCER"], os.environ["ADMIN"]
STREAM_INFO = "$JS.API.STREAM.INFO.ROLLCALL_CATALOG"
nodes, children = {}, []

def start_node(n):
    log = open(f"{RUN_DIR}/node-{n}.log", "a")
    nodes[n] = subprocess.Popen([os.environ["NATS_BIN"], "-c", f"{RUN_DIR}/node-{n}.conf"],
                                stdout=log, stderr=log)

def spawn(args, name):
    log = open(f"{RUN_DIR}/{name}.log", "a")
    children.append(subprocess.Popen([BIN, *args], stdout=log, stderr=log))

def rotated(k):
    return ",".join(URLS[k:] + URLS[:k])

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except Exception:
        return None, b""

def healthy(n):
    return get(f"http://127.0.0.1:1823{n}/healthz")[0] == 200

def balancer_revision():
    status, body = get(f"http://{ADMIN}/catalog")
    if status != 200:
        return None
    services = json.loads(body)
    services = services.get("services", services) if isinstance(services, dict) else services
    for s in services:
        if s.get("service") == "web":
            return s.get("revision")
    return None

def balancer_node():
    """The node the balancer is connected to, by its connection name."""
    for n in nodes:
        status, body = get(f"http://127.0.0.1:1823{n}/connz?limit=1024")
        if status == 200 and any(c.get("name") == "rollcall-balancer"
                                 for c in json.loads(body).get("connections", [])):
            return n
    return None

load = None


async def stream_info(nc):
    try:
        reply = await nc.request(STREAM_INFO, b"", timeout=1)
        return json.loads(reply.data)
    except Exception:
        return {}

async def whole(nc):
    """Every node healthy, the stream led, both followers current."""
    while True:
        cluster = (await stream_info(nc)).get("cluster", {})
        followers = cluster.get("replicas", [])
        if (all(healthy(n) for n in nodes) and cluster.get("leader")
                and len(followers) == 2 and all(r.get("current") for r in followers)):
            return cluster["leader"]
        await asyncio.sleep(0.05)

async def main():
    for n in (1, 2, 3):
        start_node(n)
    while not all(healthy(n) for n in (1, 2, 3)):
        await asyncio.sleep(0.05)
    async def reconnecting(error):  # a killed node is expected; nats-py reconnects
        pass
    nc = await nats.connect(servers=URLS, error_cb=reconnecting)
    snapshots = []
    records = Assembler()
    async def on_snapshot(m):
        subject, s = records.take(json.loads(m.data))
        snapshots.append((time.monotonic(), subject, s))
    await nc.subscribe("rollcall.catalog.>", cb=on_snapshot)
    for k in range(3):
        spawn(["discovery", "--nats", rotated(k), "--replica", f"d{k}"], f"d{k}")
    spawn(["balancer", "--nats", rotated(1), "--listen", BALANCER, "--admin", ADMIN, "web"], "balancer")
    stable = [record(i, p) for i, p in enumerate(PORTS)]
    churning = asyncio.Event(); churning.set()
    tasks = [asyncio.create_task(heartbeats(nc, stable)),
             asyncio.create_task(churn(nc, PORTS[0], churning))]
    while not any(len(s[2]["instances"]) >= 3 for s in snapshots):  # all three joined
        await asyncio.sleep(0.05)
    while balancer_revision() is None:
        await asyncio.sleep(0.05)
    await whole(nc)
    global load
    load = Requests(lambda url: get(url)[0], f"http://{BALANCER}/")
    # The balancer's gap: when its own node died, and when another did.
    stored_gaps, routed_gaps, own_gaps = [], [], []
    for k in range(KILLS):
        leader = await whole(nc)
        victim = int(leader.rsplit("-", 1)[1])
        churning.clear()
        await asyncio.sleep(0.3)
        before = balancer_revision()
        own = balancer_node() == victim
        nodes[victim].send_signal(signal.SIGKILL)
        nodes[victim].wait()
        killed = time.monotonic()
        churning.set()
        stored = routed = None
        while time.monotonic() - killed < 30 and (stored is None or routed is None):
            await asyncio.sleep(0.01)
            if stored is None:
                after = [t for t, _, _ in snapshots if t > killed]
                stored = after[0] - killed if after else None
            if routed is None:
                revision = balancer_revision()
                if revision is not None and before is not None and revision > before:
                    routed = time.monotonic() - killed
        stored_gaps.append(stored if stored is not None else float("inf"))
        (own_gaps if own else routed_gaps).append(routed if routed is not None else float("inf"))
        new = (await stream_info(nc)).get("cluster", {}).get("leader", "-")
        ms = lambda g: g * 1000 if g is not None else -1
        print(f"STREAM_FAILOVER kill={k+1} stream_leader={leader} new={new} "
              f"stored_ms={ms(stored):.0f} balancer_ms={ms(routed):.0f} "
              f"balancer_on_killed_node={'yes' if own else 'no'}", flush=True)
        start_node(victim)
    await whole(nc)
    load.stop()
    for t in tasks: t.cancel()
    shrunken, regressions = invariants([(subject, s) for _, subject, s in snapshots],
                                       {r["id"] for r in stable})
    print(f"STREAM_FAILOVER_SUMMARY kills={KILLS} stored: {percentiles(stored_gaps)} "
          f"balancer_elsewhere({len(routed_gaps)}): {percentiles(routed_gaps)} "
          f"balancer_on_killed_node({len(own_gaps)}): {percentiles(own_gaps)} snapshots={len(snapshots)} shrunken={shrunken} "
          f"revision_regressions={regressions} requests={load.served} failed_requests={load.failed}", flush=True)
    await nc.close()

try:
    asyncio.run(main())
finally:  # every process started here is stopped here, by its handle
    if load is not None:
        load.stop()
    for p in children + list(nodes.values()):
        p.send_signal(signal.SIGTERM)
    for p in children + list(nodes.values()):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
EOF

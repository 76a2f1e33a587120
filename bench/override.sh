#!/usr/bin/env bash
# Operator overrides: one nats-server, one `rollcall discovery`, one instance
# registered. ROUNDS times, alternately drain and undrain it with a NATS
# request (what `rollcall drain` sends) and time, from the request:
#   reply   - discovery's answer (sent once the snapshot is stored);
#   catalog - the record carrying the change on rollcall.catalog.web.web-1
#             (what every balancer follows).
#
# Prints OVERRIDE lines (p50/p99/max in ms) and refusals seen (must be 0).
#
# Env: ROUNDS (200), OVERRIDE_BIN (target/debug/rollcall: the stored write's
#      round trip, not the code's speed, sets the figures), ROLLCALL_PYTHON
#      (python with nats-py).
source "$(dirname "$0")/lib.sh"

ROUNDS="${ROUNDS:-200}"
ROLLCALL_BIN="${OVERRIDE_BIN:-$TARGET_DIR/debug/rollcall}"
PYTHON="${ROLLCALL_PYTHON:-python3}"
NATS_BIN="${NATS_SERVER_BIN:-nats-server}"
[[ -x "$ROLLCALL_BIN" ]] || (cd "$ROOT" && cargo build --bin rollcall)

assert_port_free "$NATS_PORT"
"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$RUN_DIR/js" >"$RUN_DIR/nats.log" 2>&1 &
track $!
wait_port "$NATS_PORT"
"$ROLLCALL_BIN" discovery --nats "$NATS_URL_BENCH" >"$RUN_DIR/discovery.log" 2>&1 &
track $!
for _ in $(seq 100); do grep -q "leading the catalog" "$RUN_DIR/discovery.log" && break; sleep 0.05; done
log "rounds=$ROUNDS rollcall=$ROLLCALL_BIN nats=$("$NATS_BIN" --version)"

ROUNDS="$ROUNDS" NATS_URL_BENCH="$NATS_URL_BENCH" "$PYTHON" - <<'PY'
import asyncio, json, os, time
import nats

async def main():
    nc = await nats.connect(os.environ["NATS_URL_BENCH"])
    catalog = await nc.subscribe("rollcall.catalog.web.*")
    record = {"service": "web", "id": "web-1", "address": "127.0.0.1", "port": 5001, "ttl_ms": 600000}
    await nc.publish("rollcall.register.web.web-1", json.dumps(record).encode())
    await catalog.next_msg(timeout=5)
    replies, snapshots, refused = [], [], 0
    for i in range(int(os.environ["ROUNDS"])):
        action = "drain" if i % 2 == 0 else "undrain"
        want = 0 if action == "drain" else 1
        start = time.perf_counter()
        answer = await nc.request(f"rollcall.operator.{action}.web.web-1", b'{"by":"bench"}', timeout=5)
        replies.append(time.perf_counter() - start)
        if not json.loads(answer.data).get("ok"):
            refused += 1
        while True:
            record = json.loads((await catalog.next_msg(timeout=5)).data)
            if record.get("instance", {}).get("weight") == want:
                break
        snapshots.append(time.perf_counter() - start)
    def line(name, xs):
        xs = sorted(x * 1000 for x in xs)
        p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
        print(f"OVERRIDE {name} n={len(xs)} p50={p(0.5):.2f}ms p99={p(0.99):.2f}ms max={xs[-1]:.2f}ms")
    line("request->reply", replies)
    line("request->catalog", snapshots)
    print(f"OVERRIDE refused={refused}")
    await nc.close()

asyncio.run(main())
PY

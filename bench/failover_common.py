"""What bench/failover.sh and bench/failover_cluster.sh share: the instances'
records and heartbeats, the churning instance, the client request loop, the
invariants checked over every snapshot seen, and the percentiles printed."""
import asyncio, json, statistics, threading, time


def record(i, port):
    return {"service": "web", "id": f"web-{i}", "address": "127.0.0.1", "port": port,
            "ttl_ms": 1500, "weight": 1}


async def heartbeats(nc, stable):
    """Every 200 ms a heartbeat for each of `stable` (TTL 1.5 s)."""
    while True:
        for r in stable:
            await nc.publish(f"rollcall.heartbeat.web.{r['id']}", json.dumps(r).encode())
        await asyncio.sleep(0.2)


async def churn(nc, port, running=None):
    """web-x joins and leaves every 50 ms (weight 0: it takes no traffic),
    while `running` (an asyncio.Event, if given) is set."""
    extra = record(9, port) | {"id": "web-x", "weight": 0}
    while True:
        if running is not None:
            await running.wait()
        await nc.publish("rollcall.register.web.web-x", json.dumps(extra).encode())
        await asyncio.sleep(0.05)
        await nc.publish("rollcall.deregister.web.web-x", b"{}")
        await asyncio.sleep(0.05)


class Requests:
    """A thread sending requests every 5 ms through `get(url) -> status or
    None` until stopped, counting served (< 400) and failed ones."""

    def __init__(self, get, url):
        self.served = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(get, url))
        self._thread.start()

    def _run(self, get, url):
        while not self._stop.is_set():
            status = get(url)
            ok = status is not None and status < 400
            self.served += ok
            self.failed += not ok
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        self._thread.join()


class Assembler:
    """Catalog records (version 3) assembled into per-service snapshots, as
    a balancer does: per instance the record with the highest revision.
    `take` returns the service's snapshot after a record, keyed by the
    service's subject; a stale record's snapshot carries that record's
    revision, so `invariants` counts it as a regression."""

    def __init__(self):
        self.services = {}

    def take(self, record):
        held = self.services.setdefault(record["service"], {})
        old = held.get(record["id"])
        stale = old is not None and record["revision"] <= old["revision"]
        if not stale:
            held[record["id"]] = record
        live = sorted((r["instance"] for r in held.values() if "instance" in r), key=lambda i: i["id"])
        revision = record["revision"] if stale else max(r["revision"] for r in held.values())
        subject = "rollcall.catalog." + record["service"]
        return subject, {"service": record["service"], "revision": revision, "instances": live}


def invariants(seen, ids):
    """(shrunken, regressions) over `seen`, (subject, snapshot) pairs in
    arrival order: snapshots lacking one of `ids` after the first that
    listed them all, and revisions not above the last on their subject."""
    listed = lambda s: ids <= {i["id"] for i in s["instances"]}
    full = next(n for n, (_, s) in enumerate(seen) if listed(s))
    shrunken = sum(1 for _, s in seen[full:] if not listed(s))
    regressions, last = 0, {}
    for subject, s in seen:
        if subject in last and s["revision"] <= last[subject]:
            regressions += 1
        last[subject] = s["revision"]
    return shrunken, regressions


def percentiles(gaps):
    """p50, p99 and max of `gaps` (seconds) in ms, as printed; "none" when empty."""
    if not gaps:
        return "none"
    ms = sorted(g * 1000 for g in gaps)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return f"p50_ms={statistics.median(ms):.0f} p99_ms={p99:.0f} max_ms={ms[-1]:.0f}"

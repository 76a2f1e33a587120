#!/usr/bin/env python3
"""Run with `source scripts/provision.sh && "$ROLLCALL_PYTHON" examples/python_service.py --name py-1`
(a nats-server on 127.0.0.1:4222, or `--nats URL`).

A tiny HTTP service in Python, standard library plus nats-py, that announces
itself by following the rollcall wire protocol (docs/protocol.md) by hand:
register on start, heartbeat every interval with the whole record, register
again after a reconnect, deregister on SIGINT/SIGTERM before it stops
listening. `GET /` answers "<message> from <name>", `GET /health` 200.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nats

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def token(kind):
    def check(value):
        if not NAME.match(value):
            raise argparse.ArgumentTypeError(
                f"{kind} {value!r} must be 1 to 64 characters from A-Z a-z 0-9 _ -"
            )
        return value

    return check


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", type=token("instance id"), default="py-1")
    parser.add_argument("--service", type=token("service"), default="web")
    parser.add_argument("--prefix", type=token("prefix"), default="rollcall")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--message", default="hello")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--ttl-ms", type=int, default=3000)
    args = parser.parse_args()
    if not 100 <= args.ttl_ms <= 600_000:
        parser.error("--ttl-ms must be 100..600000")
    if not 0 < args.interval * 1000 < args.ttl_ms:
        parser.error("--interval must be above 0 and below the ttl")
    return args


def http_server(address, port, body):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                self.answer(200, body)
            elif self.path == "/health":
                self.answer(200, b"ok\n")
            else:
                self.answer(404, b"not found\n")

        def answer(self, status, payload):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((address, port), Handler)


async def main():
    args = parse_args()
    body = f"{args.message} from {args.name}\n".encode()
    server = http_server(args.address, args.port, body)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{args.name} listening on {args.address}:{port}", flush=True)

    record = {
        "service": args.service,
        "id": args.name,
        "address": args.address,
        "port": port,
        "ttl_ms": args.ttl_ms,
        "weight": 1,
        "tags": ["python"],
        "meta": {"language": "python"},
    }
    payload = json.dumps(record).encode()

    def subject(kind):
        return f"{args.prefix}.{kind}.{args.service}.{args.name}"

    async def register():
        await nc.publish(subject("register"), payload)
        await nc.flush()

    async def reconnected():
        # The server may have lost us (or discovery restarted): say it all again.
        await register()

    async def on_error(error):
        print(f"python_service: NATS: {error!r}", file=sys.stderr, flush=True)

    # nats-py keeps retrying a first connection that fails; give it 5 s.
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                args.nats,
                name=f"python_service {args.name}",
                reconnected_cb=reconnected,
                error_cb=on_error,
            ),
            timeout=5,
        )
    except asyncio.TimeoutError:
        server.shutdown()
        sys.exit(
            f"python_service: cannot reach NATS at {args.nats} within 5 s; "
            "is nats-server running there?"
        )
    await register()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.interval)
        except asyncio.TimeoutError:
            await nc.publish(subject("heartbeat"), payload)

    # Out of the rotation first, then stop listening.
    await nc.publish(subject("deregister"), payload)
    await nc.flush()
    server.shutdown()
    await nc.close()
    print(f"{args.name} deregistered and stopped", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except OSError as error:
        sys.exit(f"python_service: {error}")

#!/usr/bin/env python3
"""Exactly REQUESTS keep-alive GETs over CONNS connections, one request in
flight per connection, for bench/instructions.sh (wrk runs for a duration,
not a count). Prints one line: requests answered, non-2xx answers, errors.

usage: keepalive_client.py URL_HOST PORT REQUESTS CONNS
"""
import asyncio
import sys


async def connection(host, port, count, tally):
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = next((int(l.split(":", 1)[1]) for l in lines[1:]
                           if l.lower().startswith("content-length:")), None)
            if length is None:
                raise ValueError(f"answer without Content-Length: {lines[0]}")
            await reader.readexactly(length)
            tally["requests"] += 1
            if not 200 <= status < 300:
                tally["non2xx"] += 1
    except (OSError, ValueError, asyncio.IncompleteReadError) as error:
        tally["errors"] += 1
        print(f"connection failed: {error}", file=sys.stderr)
    finally:
        writer.close()


async def main(host, port, total, conns):
    tally = {"requests": 0, "non2xx": 0, "errors": 0}
    shares = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    await asyncio.gather(*(connection(host, port, n, tally) for n in shares))
    print("COUNT " + " ".join(f"{k}={v}" for k, v in tally.items()))


if __name__ == "__main__":
    host, port, total, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(host, port, total, conns))

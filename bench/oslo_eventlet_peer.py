"""One process of oslo_eventlet.py: an oslo.messaging 18 service on eventlet, monkey-patched before anything
else is imported (as OpenStack services on eventlet are), so oslo picks its eventlet executor.

Run: python oslo_eventlet_peer.py server URL
       an RPC server (topic `bench`): `echo` answers, `note` counts, `count` says how many `note`s ran. It
       prints `ready`, then serves until its stdin closes.
     python oslo_eventlet_peer.py client URL calls|casts SECONDS CONCURRENCY
       CONCURRENCY green threads call `echo` (or cast `note`) on one transport for SECONDS after a second's
       warm-up, and print `result rate=... [p50=... p99=...]`: calls/s with latency percentiles (ms), or
       casts/s from the first cast to the server's run of the last (asked with `count`).
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import statistics  # noqa: E402  (after monkey-patching, as a service on eventlet imports)
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import oslo_messaging  # noqa: E402
from eventlet.hubs import trampoline  # noqa: E402

from messaging_bench import PAYLOAD, TOPIC, oslo_configuration  # noqa: E402

WARMUP = 1.0  # seconds
CALL_TIMEOUT = 30.0  # seconds


class Endpoint:
    def __init__(self) -> None:
        self.notes = 0

    def echo(self, ctxt: dict[str, Any], data: str) -> str:
        return data

    def note(self, ctxt: dict[str, Any], data: str) -> None:
        self.notes += 1

    def count(self, ctxt: dict[str, Any]) -> int:
        return self.notes


def _transport(url: str) -> Any:
    return oslo_messaging.get_rpc_transport(oslo_configuration(), url)


def serve(url: str) -> None:
    transport = _transport(url)
    server = oslo_messaging.get_rpc_server(
        transport, oslo_messaging.Target(topic=TOPIC, server="s"), [Endpoint()]
    )
    server.start()
    print("ready", flush=True)
    trampoline(sys.stdin.fileno(), read=True)  # a plain read would block the hub, and the server with it
    server.stop()
    server.wait()
    transport.cleanup()


def load(url: str, kind: str, seconds: float, concurrency: int) -> dict[str, float]:
    transport = _transport(url)
    client = oslo_messaging.get_rpc_client(
        transport, oslo_messaging.Target(topic=TOPIC), timeout=CALL_TIMEOUT
    )
    latencies: list[float] = []
    sent = [0]
    running = [True]

    def work() -> None:
        while running[0]:
            started = time.perf_counter()
            if kind == "calls":
                client.call({}, "echo", data=PAYLOAD)
            else:
                client.cast({}, "note", data=PAYLOAD)
            latencies.append(time.perf_counter() - started)
            sent[0] += 1

    def run_for(duration: float) -> float:
        running[0] = True
        pool = eventlet.GreenPool(concurrency)
        for _ in range(concurrency):
            pool.spawn(work)
        began = time.perf_counter()
        eventlet.sleep(duration)
        running[0] = False
        pool.waitall()
        return began

    def notes_run(expected: int) -> float:
        """When the server has run `expected` casts (polled)."""
        while client.call({}, "count") < expected:
            eventlet.sleep(0.005)
        return time.perf_counter()

    run_for(WARMUP)
    if kind == "casts":
        notes_run(sent[0])
    latencies.clear()
    before = sent[0]
    began = run_for(seconds)
    count = sent[0] - before
    if kind == "calls":
        ended = began + seconds
        ordered = sorted(latencies)
        result = {
            "rate": count / (ended - began),
            "p50": statistics.median(ordered) * 1000,
            "p99": ordered[int(len(ordered) * 0.99)] * 1000,
        }
    else:
        result = {"rate": count / (notes_run(sent[0]) - began)}
    transport.cleanup()
    return result


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # eventlet's and oslo's deprecation warnings
    role, url = sys.argv[1], sys.argv[2]
    if role == "server":
        serve(url)
    else:
        result = load(url, sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        print("result " + " ".join(f"{key}={value}" for key, value in result.items()), flush=True)

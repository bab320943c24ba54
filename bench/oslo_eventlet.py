"""oslo.messaging 18 services on eventlet, as many OpenStack services still run: the meshbus plugin against
the rabbit driver on RabbitMQ, in the same run. messaging_bench.py measures both with oslo's threading
executor; on eventlet, oslo picks its eventlet executor and the callers are green threads.

Owns: the broker (a private rabbitmq-server, or a `meshbus router`), and per figure an RPC server and a load
client, each oslo_eventlet_peer.py in a process of its own, placed as messaging_bench places them. One line
per figure: `name value unit`, then the rabbit driver's figure of the same run and the ratio.
Must not: install anything, listen beyond 127.0.0.1, or signal a process it did not start (it stops its own
by PID).

Run: .venv/bin/python bench/oslo_eventlet.py [--seconds 5] [--repeat 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import rabbit
from router_bench import ROUTER, ROUTER_CPUS, BenchError, Figure, report, router, running, stop_on_sigterm

PEER = Path(__file__).with_name("oslo_eventlet_peer.py")
SYSTEMS = {"rabbit": "oslo.messaging 18 rabbit driver, RabbitMQ", "oslo_meshbus": "the meshbus plugin"}
KINDS = {"calls": "calls/s", "casts": "casts/s"}


@contextlib.contextmanager
def broker(system: str) -> Iterator[str]:
    """The system's broker; yields its transport URL."""
    if system == "rabbit":
        if (reason := rabbit.missing()) is not None:
            raise BenchError(reason)
        with rabbit.rabbitmq("eventlet-bench", cpus=ROUTER_CPUS) as node:
            yield f"rabbit://guest:guest@{node.host}:{node.port}/"
        return
    with router([str(ROUTER), "router"]) as (_, host_port):
        yield f"meshbus://{host_port}/"


def measure(url: str, kind: str, seconds: float, concurrency: int) -> dict[str, float]:
    """One run: a fresh server, then the load client against it."""
    with running("server", [sys.executable, str(PEER), "server", url], hold_stdin=True) as server:
        server.expect("^ready$", 60)
        argv = [sys.executable, str(PEER), "client", url, kind, str(seconds), str(concurrency)]
        with running("client", argv) as client:
            result = client.result(seconds + 60)
        server.close_stdin()
        server.wait(60)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured run (default 5)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per figure, the median reported (default 3)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="green threads calling (default 16)")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    rabbit_figures: dict[str, float] = {}
    for system, description in SYSTEMS.items():
        print(f"# {system}: {description}, eventlet executor, {args.concurrency} green threads", flush=True)
        with broker(system) as url:
            for kind, unit in KINDS.items():
                runs = [
                    measure(url, kind, args.seconds, args.concurrency) for _ in range(max(args.repeat, 1))
                ]
                name = f"eventlet_{system}_{kind}_{args.concurrency}_green_threads"
                rate = statistics.median(run["rate"] for run in runs)
                peer = None if system == "rabbit" else "rabbit"
                report(
                    Figure(name, rate, unit, peer, rabbit_figures.get(kind), [run["rate"] for run in runs])
                )
                if system == "rabbit":
                    rabbit_figures[kind] = rate
                if kind == "calls":
                    median_run = min(runs, key=lambda run: abs(run["rate"] - rate))
                    for percentile in ("p50", "p99"):
                        report(Figure(f"{name}_{percentile}", median_run[percentile], "ms"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, rabbit.RabbitError) as error:
        print(f"oslo_eventlet: {error}", file=sys.stderr)
        sys.exit(1)

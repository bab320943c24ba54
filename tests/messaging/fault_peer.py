"""An RPC server in a process of its own, for tests that kill it mid-call (test_faults.py).

`python fault_peer.py URL TOPIC` serves TOPIC as server "peer" and prints `ready` once attached; its `work`
method prints `working` when a call arrives, then sleeps the seconds it was asked to.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from meshbus.messaging import RPCServer, Target, Transport


class Slow:
    def work(self, ctxt: dict[str, Any], seconds: float) -> str:
        print("working", flush=True)
        time.sleep(seconds)
        return "done"


def main(url: str, topic: str) -> None:
    transport = Transport(url)
    RPCServer(transport, Target(topic=topic, server="peer"), [Slow()]).start()
    print("ready", flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

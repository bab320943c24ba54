"""A Transport in a process that forks (in a subprocess: forking this test process, with its threads, would
copy them half-way): the child cannot use the parent's transport, and says so at once instead of waiting
for an I/O thread that stayed in the parent; a transport of its own works."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Router

PEER_TIMEOUT = 60.0  # seconds

SCRIPT = """
import json, os, select, sys
from meshbus.messaging import MessagingError, RPCClient, RPCServer, Target, Transport

class Echo:
    def echo(self, ctxt, text):
        return {"text": text, "served_by": os.getpid()}

url = sys.argv[1]
transport = Transport(url)
server = RPCServer(transport, Target(topic="fork-echo", server="parent"), [Echo()])
server.start()
client = RPCClient(transport, Target(topic="fork-echo"), timeout=10)
report = {"parent": os.getpid(), "before": client.call({}, "echo", text="before")}
readable, writable = os.pipe()
pid = os.fork()
if pid == 0:
    seen = {}
    try:
        client.call({}, "echo", text="inherited")
        seen["inherited"] = "answered"
    except MessagingError as error:
        seen["inherited"] = str(error)
    own = Transport(url)
    seen["own"] = RPCClient(own, Target(topic="fork-echo"), timeout=10).call({}, "echo", text="own")
    own.close()
    transport.close()  # nothing: the connection and its thread are the parent's
    os.write(writable, json.dumps(seen).encode())
    os._exit(0)
os.close(writable)
if select.select([readable], [], [], 20)[0]:
    report.update(json.loads(os.read(readable, 65536)))
os.waitpid(pid, 0)
report["after"] = client.call({}, "echo", text="after")
server.stop()
server.wait()
transport.close()
print(json.dumps(report))
"""


def test_a_forked_child_is_told_to_make_its_own_transport_and_the_parents_goes_on(
    default_router: Router,
) -> None:
    url = f"meshbus://{default_router.host}:{default_router.port}/"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url], capture_output=True, text=True, timeout=PEER_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    parent = report["parent"]
    assert report["before"] == {"text": "before", "served_by": parent}
    assert "before it forked this one" in report["inherited"]
    assert "Make a new Transport in this process" in report["inherited"]
    assert report["own"] == {"text": "own", "served_by": parent}
    assert report["after"] == {"text": "after", "served_by": parent}

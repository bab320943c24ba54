"""fork_peer.py in a process that eventlet monkey-patched first, as an oslo service on eventlet that forks
its workers (oslo.service's ProcessLauncher)."""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import runpy  # noqa: E402  (after monkey-patching, as a service on eventlet imports)

if __name__ == "__main__":
    runpy.run_module("tests.oslo.fork_peer", run_name="__main__")

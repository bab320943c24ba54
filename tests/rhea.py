"""rhea, a standard AMQP 1.0 client for Node.js, for the interop tests: tests/interop/rhea/peer.js under Node.

1. `modules()` installs the packages of tests/interop/rhea/package-lock.json with `npm ci` into
   `<repo>/.cache/rhea-node` the first time a test asks (tests/cached.py: it outlives the session, made again
   when the lock file or Node changes).
2. `peers()` starts peer.js (json_peers.py collects the JSON lines it prints); `require_node()` skips the
   calling test, saying why, when Node or npm is missing or the npm registry cannot be reached.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import cached, json_peers
from tests.json_peers import Peer, Start

PROJECT = Path(__file__).resolve().parent / "interop" / "rhea"
PEER = PROJECT / "peer.js"
MODULES = cached.CACHE / "rhea-node"
FILES = ("package.json", "package-lock.json")


def _node_version() -> str:
    done = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


@functools.cache
def modules() -> Path:
    """The node_modules directory with rhea in it, installed first if missing or stale."""
    made_from = "".join((PROJECT / name).read_text() for name in FILES) + f"// node {_node_version()}\n"
    copy = [["cp", *(str(PROJECT / name) for name in FILES), str(MODULES)]]
    npm = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
    cached.make(MODULES, made_from, [*copy, npm], what="rhea (npm ci)", index=_registry_address)
    return MODULES / "node_modules"


def _registry_address() -> tuple[str, int]:
    """Where npm downloads from, as npm's configuration says."""
    done = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True, timeout=30)
    url = urlsplit(done.stdout.strip() or "https://registry.npmjs.org/")
    return url.hostname or "registry.npmjs.org", url.port or (80 if url.scheme == "http" else 443)


def require_node() -> Path:
    """`modules()`, or the calling test skipped, saying why."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"the rhea interop tests need Node.js and npm: `{tool}` is not on PATH")
    return cached.require(modules)


def peers() -> AbstractContextManager[Start]:
    """`json_peers.peers` of peer.js: `start(mode, url, **args)`."""

    def command(mode: str, url: str, **args: Any) -> Peer:
        return Peer(["node", str(PEER), mode, url, json.dumps(args)], env={"NODE_PATH": str(modules())})

    return json_peers.peers(command)

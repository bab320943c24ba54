"""The `meshbus` command: `meshbus router`, `meshbus store`, `meshbus users add|remove|list`.

1. This module owns the command line: arguments, logging set-up, exit codes, and the one-line
   `meshbus: error: ...` a user sees instead of a traceback for a mistake they can fix.
2. It must not hold router logic: it hands a checked `RouterConfig` to `meshbus.amqp.server.run`.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from meshbus import __version__
from meshbus.config import ConfigError, ListenerConfig, LogLevel, RouterConfig, default_config, load_config
from meshbus.users import UserDatabase, UsersError, add_user, remove_user

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Control characters a peer put in what the log quotes (a container id, an address, a user name), escaped:
# a line break in one would otherwise start a line the peer wrote.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


class _OneLineFormatter(logging.Formatter):
    """Each record on one line, whatever its arguments hold (a traceback after it keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        return _error(str(exc), status=2)
    except UsersError as exc:
        return _error(str(exc))


def _error(message: str, status: int = 1) -> int:
    print(f"meshbus: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshbus", description="AMQP 1.0 message router.")
    parser.add_argument("--version", action="version", version=f"meshbus {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    router = commands.add_parser("router", help="run a router")
    router.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    router.add_argument(
        "--listen",
        type=_host_port,
        action="append",
        metavar="HOST:PORT",
        help="listen here instead of the configured listeners (repeatable)",
    )
    router.add_argument("--log-level", choices=get_args(LogLevel), help="overrides [router] log_level")
    router.set_defaults(command=_router)

    store = commands.add_parser(
        "store",
        help="run a store: a router that keeps the mesh's durable queues, attached through its connectors",
        description="A router process whose job is its embedded store: it listens only where its "
        "configuration says (no default client listener) and reaches the mesh through its [[connector]] "
        "tables or an inter-router [[listener]]; the mesh routes the queues it stores to it.",
    )
    store.add_argument("--config", type=Path, metavar="FILE", required=True, help="TOML configuration file")
    store.add_argument("--log-level", choices=get_args(LogLevel), help="overrides [router] log_level")
    store.set_defaults(command=_store)

    users = commands.add_parser("users", help="edit a users file for SASL PLAIN")
    users_commands = users.add_subparsers(required=True, metavar="ACTION")
    add = users_commands.add_parser("add", help="add a user or change their password")
    add.set_defaults(command=_users_add)
    remove = users_commands.add_parser("remove", help="remove a user")
    remove.set_defaults(command=_users_remove)
    listing = users_commands.add_parser("list", help="list the user names")
    listing.set_defaults(command=_users_list)
    for action in (add, remove, listing):
        action.add_argument("file", type=Path, metavar="FILE")
    for action in (add, remove):
        action.add_argument("user", metavar="USER")
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:5672
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with PORT in 0..65535, got {text!r}")
    return host, int(port)


def _router(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config is not None else default_config()
    if args.listen:
        listeners = [ListenerConfig(host=host, port=port) for host, port in args.listen]
        config = config.model_copy(update={"listener": listeners})
    return _run(config, args.log_level)


def _store(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if "listener" not in config.model_fields_set:  # no client listener unless asked for
        config = config.model_copy(update={"listener": []})
    if not config.store.enabled:
        return _error(f"{args.config}: [store] enabled is false; a store process keeps queues: set it true")
    if not config.connector and not any(listener.role == "inter-router" for listener in config.listener):
        return _error(
            f"{args.config}: a store process reaches the mesh through other routers: add a [[connector]] "
            'to a router\'s inter-router listener, or a [[listener]] with role = "inter-router"'
        )
    return _run(config, args.log_level)


def _run(config: RouterConfig, log_level: LogLevel | None) -> int:
    if log_level:
        config.router.log_level = log_level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(
        level=logging.getLevelNamesMapping()[config.router.log_level.upper()], handlers=[handler]
    )
    # Imported here: the server loads proton's C library, which the users commands do not need.
    from meshbus.amqp.server import run

    return run(config)


def _users_add(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            return _error("the passwords differ; nothing changed")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        return _error("empty password; nothing changed")
    add_user(args.file, args.user, password)
    return 0


def _users_remove(args: argparse.Namespace) -> int:
    if not remove_user(args.file, args.user):
        return _error(f"{args.file}: no user {args.user!r}; 'meshbus users list {args.file}' shows them")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    for name in UserDatabase.load(args.file).names:
        print(name)
    return 0

"""The router's configuration: the TOML schema, its defaults, loading and validation.

1. This module owns the schema every other module reads (`RouterConfig` and its tables) and the
   error messages a user sees for a bad configuration file: file, line, field, and what to do.
2. It must not start anything, open sockets or configure logging: it only turns a file into values.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from meshbus.mesh.config import MeshConfig
from meshbus.router.addressing import (
    DEFAULT_QUEUE_RULES,
    DEFAULT_RULES,
    AddressRule,
    Distribution,
    DistributionRules,
    QueueRule,
    QueueRules,
    check_pattern,
    check_prefix,
)
from meshbus.store.queue import QueueLimits

SaslMechanism = Literal["ANONYMOUS", "PLAIN"]
LogLevel = Literal["debug", "info", "warning", "error"]
# normal: clients; inter-router: other meshbus routers of the mesh.
Role = Literal["normal", "inter-router"]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file, line and field."""


class _Table(BaseModel):
    # TOML values are typed already: a port written as "5672" is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class RouterSettings(_Table):
    """The [router] table."""

    id: str = Field(default_factory=lambda: f"meshbus-{socket.gethostname()}", min_length=1)
    log_level: LogLevel = "info"
    # Relative to the configuration file's directory (`load_config` makes it absolute).
    users_file: Path | None = Field(default=None, strict=False)
    # Microseconds to keep polling the sockets after each burst of traffic instead of sleeping, while bursts
    # arrive on average less than 5 such windows apart: saves the wake-up latency (large in VMs) under dense
    # traffic, for up to a busy core while it lasts; sparse traffic and idle routers sleep. 0 disables.
    busy_poll: int = Field(default=200, ge=0, le=100_000)


class ListenerConfig(_Table):
    """One [[listener]] table: where the router accepts connections, and on which terms."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=5672, ge=0, le=65535)  # 0: any free port
    sasl_mechanisms: list[SaslMechanism] = Field(default=["ANONYMOUS", "PLAIN"], min_length=1)
    authenticate_peer: bool = False  # checked after sasl_mechanisms, which it depends on
    idle_timeout: float = Field(default=16.0, ge=0)  # seconds; 0 disables
    max_frame_size: int = Field(default=65536, ge=512, le=2**32 - 1)
    link_capacity: int = Field(default=250, ge=1)
    max_message_size: int = Field(default=0, ge=0)  # bytes; 0: unlimited
    role: Role = "normal"
    cost: int = Field(default=1, ge=1, le=1 << 24)  # inter-router: this end's cost for paths over it

    @field_validator("sasl_mechanisms")
    @classmethod
    def _each_mechanism_once(cls, mechanisms: list[SaslMechanism]) -> list[SaslMechanism]:
        for mechanism in mechanisms:
            if mechanisms.count(mechanism) > 1:
                raise ValueError(f'"{mechanism}" is listed twice; list each mechanism once')
        return mechanisms

    @field_validator("authenticate_peer")
    @classmethod
    def _plain_offered(cls, authenticate: bool, info: ValidationInfo) -> bool:
        if authenticate and "PLAIN" not in info.data.get("sasl_mechanisms", ["PLAIN"]):
            raise ValueError('true needs "PLAIN" in sasl_mechanisms; add it there, or set false')
        return authenticate


class ConnectorConfig(_Table):
    """One [[connector]] table: a connection the router keeps open to another router (role inter-router) or
    to an external AMQP 1.0 broker serving queues (role broker, named by [[queue]] tables), reconnecting
    with back-off while it cannot."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    role: Literal["inter-router", "broker"] = "inter-router"
    name: str | None = Field(default=None, min_length=1)  # a broker's, for [[queue]] tables and logs
    cost: int = Field(default=1, ge=1, le=1 << 24)
    idle_timeout: float = Field(default=16.0, ge=0)
    max_frame_size: int = Field(default=65536, ge=512, le=2**32 - 1)
    link_capacity: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _broker_named(self) -> ConnectorConfig:
        if self.role == "broker" and self.name is None:
            raise ValueError('a broker needs a name (for the [[queue]] tables it serves); add name = "..."')
        return self


_MESH_DEFAULTS = MeshConfig()


class MeshSettings(_Table):
    """The [mesh] table: the routing protocol's timers, in seconds (meshbus.mesh.config has the rules)."""

    hello_interval: float = Field(default=_MESH_DEFAULTS.hello_interval, gt=0, strict=False)
    hello_timeout: float = Field(default=_MESH_DEFAULTS.hello_timeout, gt=0, strict=False)
    advertise_interval: float = Field(default=_MESH_DEFAULTS.advertise_interval, gt=0, strict=False)

    @model_validator(mode="after")
    def _consistent(self) -> MeshSettings:
        self.protocol()
        return self

    def protocol(self) -> MeshConfig:
        return MeshConfig(
            hello_interval=self.hello_interval,
            hello_timeout=self.hello_timeout,
            advertise_interval=self.advertise_interval,
        )


class AddressConfig(_Table):
    """One [[address]] table: a distribution rule, added after the built-in ones."""

    prefix: Annotated[str, AfterValidator(check_prefix)] | None = None
    pattern: Annotated[str, AfterValidator(check_pattern)] | None = None
    distribution: Distribution = Field(default=Distribution.BALANCED, strict=False)

    @model_validator(mode="after")
    def _one_of_prefix_and_pattern(self) -> AddressConfig:
        self.rule()
        return self

    def rule(self) -> AddressRule:
        return AddressRule(prefix=self.prefix, pattern=self.pattern, distribution=self.distribution)


class StoreSettings(_Table):
    """The [store] table: the store embedded in this router, which keeps the queues (issue 6)."""

    enabled: bool = True  # false: this router stores nothing; its queue addresses go to the mesh's stores
    # Default: $XDG_STATE_HOME (or ~/.local/state)/meshbus/<router id>.db. Relative to the configuration
    # file's directory (`load_config` makes it absolute).
    path: Path | None = Field(default=None, strict=False)
    # "full": every group commit is fsync'd, so what the store accepted survives a power cut. "normal": a
    # commit reaches the operating system, not the disk: it survives the router's crash (kill -9) but maybe
    # not the machine's, and a producer waits for no fsync (bench/README.md has the figures).
    sync: Literal["full", "normal"] = "full"
    # Seconds a group commit may wait while a consumer holds one of its new messages: what is accepted
    # meanwhile is never written, and its producer is accepted then. 0: commit at once.
    commit_delay: float = Field(default=0.002, ge=0, le=1.0, strict=False)


_QUEUE_DEFAULTS = QueueLimits()
_STORE_ONLY = frozenset({"max_depth", "max_bytes", "max_deliveries", "dead_letter"})  # [[queue]] fields
DEFAULT_BROKER_PREFIX = "/queue/"  # RabbitMQ's AMQP 1.0 plugin: /queue/NAME is queue NAME


class QueueConfig(_Table):
    """One [[queue]] table: addresses that are durable queues, and their limits."""

    prefix: Annotated[str, AfterValidator(check_prefix)] | None = None
    pattern: Annotated[str, AfterValidator(check_pattern)] | None = None
    max_depth: int = Field(default=_QUEUE_DEFAULTS.max_depth, ge=1)  # messages
    max_bytes: int = Field(default=_QUEUE_DEFAULTS.max_bytes, ge=1)  # payload bytes
    max_deliveries: int = Field(default=_QUEUE_DEFAULTS.max_deliveries, ge=0)  # 0: no limit
    dead_letter: str | None = Field(default=None, min_length=1)  # an address of a queue; none: dropped
    broker: str | None = Field(default=None, min_length=1)  # the name of the broker serving these queues
    # The broker's address of queue X: this prefix, then X with each '/' written %2F (RabbitMQ's AMQP 1.0
    # plugin reads '/' as a separator of its own and %2F as a '/' in the queue's name).
    broker_prefix: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of_prefix_and_pattern(self) -> QueueConfig:
        self.rule()
        store_only = sorted(_STORE_ONLY & self.model_fields_set)
        if self.broker is not None and store_only:
            raise ValueError(
                f"{', '.join(store_only)}: limits of the embedded store, which does not keep a broker's "
                "queues (the broker's own policies apply); remove them here"
            )
        if self.broker_prefix is not None and self.broker is None:
            raise ValueError(
                'broker_prefix is for queues served by a broker; add broker = "<connector name>"'
            )
        return self

    def rule(self) -> QueueRule:
        return QueueRule(prefix=self.prefix, pattern=self.pattern)

    def broker_address(self, address: str) -> str:
        """The address on its broker of this rule's queue `address`."""
        return (self.broker_prefix or DEFAULT_BROKER_PREFIX) + address.replace("/", "%2F")

    def limits(self) -> QueueLimits:
        return QueueLimits(
            max_depth=self.max_depth,
            max_bytes=self.max_bytes,
            max_deliveries=self.max_deliveries,
            dead_letter=self.dead_letter,
        )


class RouterConfig(_Table):
    """A whole configuration file."""

    router: RouterSettings = Field(default_factory=RouterSettings)
    listener: list[ListenerConfig] = Field(default_factory=lambda: [ListenerConfig()])
    connector: list[ConnectorConfig] = Field(default_factory=list)
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    address: list[AddressConfig] = Field(default_factory=list)
    store: StoreSettings = Field(default_factory=StoreSettings)
    queue: list[QueueConfig] = Field(default_factory=list)

    def dead_letter_errors(self) -> list[tuple[int, str]]:
        """(index of the [[queue]] table, what is wrong) for each dead_letter that is not a queue of another
        rule (its dead letters would be dropped, or come back to it)."""
        rules = self.queue_rules()
        errors = []
        for index, queue in enumerate(self.queue):
            if queue.dead_letter is None:
                continue
            rule = rules.lookup(queue.dead_letter)
            if rule is None:
                errors.append(
                    (
                        index,
                        f"{queue.dead_letter!r} is not a queue address; add a [[queue]] rule matching it, or "
                        "choose an address one matches",
                    )
                )
            elif rule == queue.rule():
                errors.append(
                    (
                        index,
                        f"{queue.dead_letter!r} is a queue of this rule itself, so its dead letters would "
                        "come back to it; choose an address another [[queue]] rule matches",
                    )
                )
        return errors

    def broker_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(field, what is wrong) for each broker name given twice and each [[queue]] table naming a broker
        that is not a connector of this file."""
        errors: list[tuple[tuple[str | int, ...], str]] = []
        brokers: set[str] = set()
        for index, connector in enumerate(self.connector):
            if connector.name is None:
                continue
            if connector.name in brokers:
                errors.append(
                    (
                        ("connector", index, "name"),
                        f"{connector.name!r} names another connector; give each its own",
                    )
                )
            brokers.add(connector.name)
        names = {c.name for c in self.connector if c.role == "broker"}
        for index, queue in enumerate(self.queue):
            if queue.broker is not None and queue.broker not in names:
                known = ", ".join(sorted(repr(name) for name in names)) or "none"
                errors.append(
                    (
                        ("queue", index, "broker"),
                        f'{queue.broker!r} is not the name of a [[connector]] with role = "broker" (brokers '
                        f"here: {known}); add one, or correct the name",
                    )
                )
        return errors

    def brokered_queues(self) -> dict[QueueRule, QueueConfig]:
        """The queue rules served by a broker, with their tables (a later table of a rule wins)."""
        return {queue.rule(): queue for queue in self.queue if queue.broker is not None}

    def distribution_rules(self) -> DistributionRules:
        """The built-in rules followed by the configured ones (which win ties)."""
        return DistributionRules([*DEFAULT_RULES, *(address.rule() for address in self.address)])

    def queue_rules(self) -> QueueRules:
        """The built-in queue rules followed by the configured ones (which win ties)."""
        return QueueRules([*DEFAULT_QUEUE_RULES, *(queue.rule() for queue in self.queue)])

    def queue_limits(self) -> dict[QueueRule, QueueLimits]:
        """The limits of each queue rule the embedded store serves (a configured rule equal to a built-in one
        sets its limits): every rule but those served by a broker, whose limits are the broker's."""
        limits = dict.fromkeys(DEFAULT_QUEUE_RULES, _QUEUE_DEFAULTS)
        limits.update((queue.rule(), queue.limits()) for queue in self.queue)
        for rule in self.brokered_queues():
            del limits[rule]
        return limits

    def store_path(self) -> Path:
        """Where this router's store file is."""
        if self.store.path is not None:
            return self.store.path
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "meshbus" / f"{self.router.id}.db"


def default_config() -> RouterConfig:
    """The configuration used when no file is given: one listener on 127.0.0.1:5672."""
    return RouterConfig()


def load_config(path: Path) -> RouterConfig:
    """Read and check a TOML configuration file; raise ConfigError saying what to fix."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file; check the path") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        config = RouterConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(path, exc)) from None
    except ValidationError as exc:
        lines = text.splitlines()
        raise ConfigError("\n".join(_describe(path, lines, error) for error in exc.errors())) from None
    dead_letters = config.dead_letter_errors()
    if dead_letters:
        lines = text.splitlines()
        found = [
            (index, _find_line(lines, ("queue", index, "dead_letter")), error)
            for index, error in dead_letters
        ]
        raise ConfigError(
            "\n".join(f"{path}:{line}: queue[{index}].dead_letter: {error}" for index, line, error in found)
        )
    broker_errors = config.broker_errors()
    if broker_errors:
        lines = text.splitlines()
        raise ConfigError("\n".join(_describe_field(path, lines, loc, error) for loc, error in broker_errors))
    if config.router.users_file is not None:
        config.router.users_file = (path.parent / config.router.users_file).resolve()
    if config.store.path is not None:
        config.store.path = (path.parent / config.store.path).resolve()
    return config


def _syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    # tomllib puts the position at the end of its message: "Invalid value (at line 3, column 8)".
    found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc))
    if found is None:
        return f"{path}: invalid TOML: {exc}"
    message, line, column = found.groups()
    return f"{path}:{line}:{column}: invalid TOML: {message}"


def _describe(path: Path, lines: list[str], error: ErrorDetails) -> str:
    loc: tuple[str | int, ...] = error["loc"]
    where, field = _where(path, lines, loc)
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_model_at(loc[:-1]).model_fields)
        return f"{where}: {field}: unknown field; the fields allowed here are {allowed}"
    if error["type"] == "value_error":  # ours: the message quotes what matters of the value
        return f"{where}: {field}: {error['ctx']['error']}"
    if isinstance(error["input"], dict):  # a whole table: its contents would be noise
        return f"{where}: {field}: {error['msg']}"
    return f"{where}: {field}: {error['msg']} (got {json.dumps(error['input'], default=str)})"


def _describe_field(path: Path, lines: list[str], loc: tuple[str | int, ...], error: str) -> str:
    where, field = _where(path, lines, loc)
    return f"{where}: {field}: {error}"


def _where(path: Path, lines: list[str], loc: tuple[str | int, ...]) -> tuple[str, str]:
    """`file:line` (the line where found) and the dotted name of a field."""
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    line = _find_line(lines, loc)
    return (f"{path}:{line}" if line is not None else str(path)), field


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel]:
    # Only these hold tables, so the first field name says which.
    tables: dict[str | int, type[BaseModel]] = {
        "router": RouterSettings,
        "listener": ListenerConfig,
        "connector": ConnectorConfig,
        "mesh": MeshSettings,
        "address": AddressConfig,
        "store": StoreSettings,
        "queue": QueueConfig,
    }
    return tables[loc[0]] if loc else RouterConfig


def _find_line(lines: list[str], loc: tuple[str | int, ...]) -> int | None:
    # tomllib keeps no positions: find the table's header, then the key inside that table.
    table, *rest = loc
    name = re.escape(str(table))
    header, nth = rf"\[\s*{name}\s*\]", 0
    if rest and isinstance(rest[0], int):  # the nth table of an array of tables: [[listener]]
        header, nth, rest = rf"\[\[\s*{name}\s*\]\]", rest[0], rest[1:]
    starts = [n for n, text in enumerate(lines) if re.fullmatch(rf"\s*{header}\s*(#.*)?", text)]
    if nth >= len(starts):
        return _key_line(lines, 0, str(table))  # not a table: perhaps `table = ...` at the top
    if rest and isinstance(rest[0], str):
        return _key_line(lines, starts[nth] + 1, rest[0]) or starts[nth] + 1
    return starts[nth] + 1


def _key_line(lines: list[str], start: int, key: str) -> int | None:
    pattern = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
    for n in range(start, len(lines)):
        if lines[n].lstrip().startswith("["):
            return None
        if pattern.match(lines[n]):
            return n + 1
    return None

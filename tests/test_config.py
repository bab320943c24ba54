import socket
import textwrap
from pathlib import Path

import pytest

from meshbus.config import (
    AddressConfig,
    ConfigError,
    ListenerConfig,
    RouterConfig,
    default_config,
    load_config,
)
from meshbus.router.addressing import Distribution

FULL_EXAMPLE = """\
[router]
id = "router-a"
log_level = "debug"
users_file = "users.txt"

[[listener]]
host = "127.0.0.1"
port = 0
sasl_mechanisms = ["PLAIN"]
authenticate_peer = true
idle_timeout = 0
max_frame_size = 512
link_capacity = 1
max_message_size = 1048576

[[listener]]
port = 5673

[[address]]
pattern = "telemetry/*/samples/#"
distribution = "multicast"

[[address]]
prefix = "openstack.org/om/rpc/anycast"
distribution = "closest"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value).replace(str(path), "router.toml")


def test_default_config_has_one_local_listener():
    config = default_config()
    assert [(listener.host, listener.port) for listener in config.listener] == [("127.0.0.1", 5672)]
    assert config.router.id == f"meshbus-{socket.gethostname()}"
    assert config.router.log_level == "info"
    assert config.router.users_file is None
    assert config.address == []


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == default_config()


def test_full_example_loads(tmp_path):
    config = load_config(write(tmp_path, FULL_EXAMPLE))
    assert config.router.id == "router-a"
    assert config.router.log_level == "debug"
    first, second = config.listener
    assert first == ListenerConfig(
        port=0,
        sasl_mechanisms=["PLAIN"],
        authenticate_peer=True,
        idle_timeout=0.0,
        max_frame_size=512,
        link_capacity=1,
        max_message_size=1048576,
    )
    assert second == ListenerConfig(port=5673)
    assert config.address == [
        AddressConfig(pattern="telemetry/*/samples/#", distribution=Distribution.MULTICAST),
        AddressConfig(prefix="openstack.org/om/rpc/anycast", distribution=Distribution.CLOSEST),
    ]


def test_users_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path / "etc")
    config = load_config(Path("..") / write(tmp_path, '[router]\nusers_file = "users.txt"\n').name)
    assert config.router.users_file == (tmp_path / "users.txt").resolve()


def test_absolute_users_file_is_kept(tmp_path):
    config = load_config(write(tmp_path, '[router]\nusers_file = "/etc/meshbus/users.txt"\n'))
    assert config.router.users_file == Path("/etc/meshbus/users.txt")


def test_configured_rules_follow_and_override_the_built_in_ones(tmp_path):
    rules = load_config(write(tmp_path, FULL_EXAMPLE)).distribution_rules()
    assert rules.lookup("telemetry/n1/samples/cpu") is Distribution.MULTICAST
    assert rules.lookup("openstack.org/om/rpc/anycast/nova/compute") is Distribution.CLOSEST
    assert rules.lookup("openstack.org/om/rpc/multicast/nova/compute") is Distribution.MULTICAST
    assert rules.lookup("elsewhere") is Distribution.BALANCED


def test_config_without_addresses_has_the_built_in_rules():
    rules = RouterConfig().distribution_rules()
    assert rules.lookup("openstack.org/om/notify/unicast/x") is Distribution.CLOSEST


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            """\
            [router]
            id = "a"

            [[listener]]
            port = 5672

            [[listener]]
            port = 70000
            """,
            "router.toml:8: listener[1].port: Input should be less than or equal to 65535 (got 70000)",
        ),
        (
            "[[listener]]\nport = -1\n",
            "router.toml:2: listener[0].port: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            '[[listener]]\nport = "5672"\n',
            'router.toml:2: listener[0].port: Input should be a valid integer (got "5672")',
        ),
        (
            "[[listener]]\n  max_frame_size = 511\n",
            "router.toml:2: listener[0].max_frame_size: Input should be greater than or equal to 512"
            " (got 511)",
        ),
        (
            "[[listener]]\nlink_capacity = 0\n",
            "router.toml:2: listener[0].link_capacity: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "[[listener]]\nidle_timeout = -0.5\n",
            "router.toml:2: listener[0].idle_timeout: Input should be greater than or equal to 0 (got -0.5)",
        ),
        (
            "[[listener]]\nmax_message_size = -1\n",
            "router.toml:2: listener[0].max_message_size: Input should be greater than or equal to 0"
            " (got -1)",
        ),
        (
            "[router]\nbusy_poll = 1000000\n",
            "router.toml:2: router.busy_poll: Input should be less than or equal to 100000 (got 1000000)",
        ),
        (
            '[router]\nlog_level = "verbose"\n',
            "router.toml:2: router.log_level: Input should be 'debug', 'info', 'warning' or 'error'"
            ' (got "verbose")',
        ),
    ],
)
def test_out_of_range_value_names_line_field_and_value(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[listener]]\nsasl_mechanisms = []\n",
            "router.toml:2: listener[0].sasl_mechanisms: List should have at least 1 item after validation,"
            " not 0 (got [])",
        ),
        (
            '[[listener]]\nsasl_mechanisms = ["PLAIN", "GSSAPI"]\n',
            "router.toml:2: listener[0].sasl_mechanisms[1]: Input should be 'ANONYMOUS' or 'PLAIN'"
            ' (got "GSSAPI")',
        ),
        (
            '[[listener]]\nsasl_mechanisms = ["PLAIN", "PLAIN"]\n',
            'router.toml:2: listener[0].sasl_mechanisms: "PLAIN" is listed twice; list each mechanism once',
        ),
        (
            '[[listener]]\nsasl_mechanisms = ["ANONYMOUS"]\nauthenticate_peer = true\n',
            'router.toml:3: listener[0].authenticate_peer: true needs "PLAIN" in sasl_mechanisms;'
            " add it there, or set false",
        ),
    ],
)
def test_sasl_settings_are_checked(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[address]]\nprefix = "a"\npattern = "b/#"\n',
            "router.toml:1: address[0]: give exactly one of prefix and pattern",
        ),
        (
            '[[address]]\ndistribution = "closest"\n',
            "router.toml:1: address[0]: give exactly one of prefix and pattern",
        ),
        (
            '[[address]]\nprefix = ""\n',
            "router.toml:2: address[0].prefix: the prefix is empty;"
            " give the leading segments of the addresses to match",
        ),
        (
            '[[address]]\npattern = ""\n',
            "router.toml:2: address[0].pattern: the pattern is empty; give segments separated by '/' or '.'",
        ),
        (
            '[[address]]\npattern = "a/b#"\n',
            "router.toml:2: address[0].pattern: the pattern 'a/b#' has 'b#':"
            " '*' and '#' must be whole segments, as in 'telemetry/*/samples/#'",
        ),
        (
            '[[address]]\nprefix = "a"\ndistribution = "fanout"\n',
            "router.toml:3: address[0].distribution: Input should be 'closest', 'balanced', 'multicast'"
            " or 'unavailable' (got \"fanout\")",
        ),
    ],
)
def test_address_rules_are_checked(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[listener]]\ncolour = "blue"\n',
            "router.toml:2: listener[0].colour: unknown field; the fields allowed here are host, port,"
            " sasl_mechanisms, authenticate_peer, idle_timeout, max_frame_size, link_capacity,"
            " max_message_size, role, cost",
        ),
        (
            '[router]\nname = "a"\n',
            "router.toml:2: router.name: unknown field;"
            " the fields allowed here are id, log_level, users_file, busy_poll",
        ),
        (
            "[[address]]\nprefix = 'a'\n'weight' = 2\n",
            "router.toml:3: address[0].weight: unknown field;"
            " the fields allowed here are prefix, pattern, distribution",
        ),
        (
            "[router]\n\n[listeners]\nport = 1\n",
            "router.toml:3: listeners: unknown field; the fields allowed here are router, listener,"
            " connector, mesh, address, store, queue",
        ),
    ],
)
def test_unknown_field_lists_the_allowed_ones(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Key not found in its table (a table-level error): the table's header line.
        ('[[listener]]\nport = 1\n\n[[address]]  # rule\nprefix = "a"\npattern = "b"\n', "router.toml:4:"),
        # An inline array of tables: the line of its key.
        ("listener = [{port = 70000}]\n", "router.toml:1:"),
        # A dotted key outside any table: no line.
        ('router.log_level = "loud"\n', "router.toml: router.log_level:"),
    ],
)
def test_line_is_found_or_left_out(tmp_path, text, message):
    assert load_error(tmp_path, text).startswith(message)


def test_every_error_is_reported(tmp_path):
    message = load_error(tmp_path, "[[listener]]\nport = 70000\nlink_capacity = 0\n")
    assert message.splitlines() == [
        "router.toml:2: listener[0].port: Input should be less than or equal to 65535 (got 70000)",
        "router.toml:3: listener[0].link_capacity: Input should be greater than or equal to 1 (got 0)",
    ]


def test_syntax_error_keeps_line_and_column(tmp_path):
    message = load_error(tmp_path, '[router]\nid = "a"\nlog_level = \n')
    assert message == "router.toml:3:13: invalid TOML: Invalid value"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"nowhere.toml: no such configuration file; check the path$"):
        load_config(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r": cannot read the configuration file: Is a directory$"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "router.toml"
    path.write_bytes(b'[router]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"router.toml:2: not UTF-8 text; save the file as UTF-8$"):
        load_config(path)


# -- the store and its queues (issue 6) ---------------------------------------------------------------------


def test_store_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path / "etc")
    config = load_config(Path("..") / write(tmp_path, '[store]\npath = "data/a.db"\n').name)
    assert config.store_path() == (tmp_path / "data" / "a.db").resolve()


def test_store_path_defaults_to_the_state_directory_and_the_router_id(tmp_path, monkeypatch):
    config = load_config(write(tmp_path, '[router]\nid = "r1"\n'))
    assert config.store.enabled
    assert config.store.sync == "full", "fsync'd commits unless the operator chooses otherwise"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert config.store_path() == tmp_path / "state" / "meshbus" / "r1.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.store_path() == tmp_path / "home" / ".local" / "state" / "meshbus" / "r1.db"


def test_notifications_are_queues_unless_configured_otherwise(tmp_path):
    config = load_config(
        write(
            tmp_path,
            """\
            [[queue]]
            pattern = "telemetry/*/samples"
            max_depth = 10
            dead_letter = "openstack.org/om/notify/dead"

            [[queue]]
            prefix = "openstack.org/om/notify"
            max_deliveries = 3
            """,
        )
    )
    rules = config.queue_rules()
    limits = config.queue_limits()
    notify = rules.lookup("openstack.org/om/notify/anycast/nova/notifications.info")
    samples = rules.lookup("telemetry/a/samples")
    assert notify is not None and samples is not None
    assert rules.lookup("openstack.org/om/rpc/anycast/nova/compute") is None
    assert limits[notify].max_deliveries == 3, "a configured rule equal to the built-in one sets its limits"
    assert (limits[samples].max_depth, limits[samples].dead_letter) == (10, "openstack.org/om/notify/dead")
    assert limits[samples].max_bytes == 1 << 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[queue]]\nprefix = "a"\npattern = "b/#"\n',
            "router.toml:1: queue[0]: give exactly one of prefix and pattern",
        ),
        (
            '[[queue]]\nprefix = "a"\nmax_depth = 0\n',
            "router.toml:3: queue[0].max_depth: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            '[[queue]]\nprefix = "a"\nttl = 5\n',
            "router.toml:3: queue[0].ttl: unknown field; the fields allowed here are prefix, pattern,"
            " max_depth, max_bytes, max_deliveries, dead_letter, broker, broker_prefix",
        ),
        (
            '[store]\nenabled = "yes"\n',
            'router.toml:2: store.enabled: Input should be a valid boolean (got "yes")',
        ),
        (
            '[store]\nsync = "off"\n',
            "router.toml:2: store.sync: Input should be 'full' or 'normal' (got \"off\")",
        ),
        (
            '[[queue]]\nprefix = "jobs"\ndead_letter = "graveyard"\n',
            "router.toml:3: queue[0].dead_letter: 'graveyard' is not a queue address;"
            " add a [[queue]] rule matching it, or choose an address one matches",
        ),
        (
            '[[queue]]\nprefix = "jobs"\ndead_letter = "jobs/dead"\n',
            "router.toml:3: queue[0].dead_letter: 'jobs/dead' is a queue of this rule itself, so its dead"
            " letters would come back to it; choose an address another [[queue]] rule matches",
        ),
    ],
)
def test_queue_and_store_tables_are_checked(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


# -- queues served by an external broker (issue 6) ----------------------------------------------------------

BROKER = '[[connector]]\nrole = "broker"\nname = "rabbit"\nhost = "127.0.0.1"\nport = 5672\n'


def test_a_broker_serves_the_queues_of_the_rules_naming_it(tmp_path):
    config = load_config(
        write(
            tmp_path,
            BROKER
            + """
            [[queue]]
            prefix = "openstack.org/om/notify"
            broker = "rabbit"

            [[queue]]
            prefix = "jobs"
            broker = "rabbit"
            broker_prefix = "/amq/queue/"
            """,
        )
    )
    rules = config.queue_rules()
    notify = rules.lookup("openstack.org/om/notify/anycast/nova/notifications.info")
    jobs = rules.lookup("jobs/a")
    assert notify is not None and jobs is not None
    brokered = config.brokered_queues()
    assert brokered.keys() == {notify, jobs}
    assert notify not in config.queue_limits(), "the store does not serve a broker's rules"
    # '/' in a queue's name is %2F for RabbitMQ; '.' stays.
    assert (
        brokered[notify].broker_address("openstack.org/om/notify/anycast/nova/notifications.info")
        == "/queue/openstack.org%2Fom%2Fnotify%2Fanycast%2Fnova%2Fnotifications.info"
    )
    assert brokered[jobs].broker_address("jobs/a") == "/amq/queue/jobs%2Fa"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[connector]]\nrole = "broker"\nhost = "127.0.0.1"\nport = 5672\n',
            "router.toml:1: connector[0]: a broker needs a name (for the [[queue]] tables it serves);"
            ' add name = "..."',
        ),
        (
            BROKER + BROKER,
            "router.toml:8: connector[1].name: 'rabbit' names another connector; give each its own",
        ),
        (
            BROKER + '[[queue]]\nprefix = "jobs"\nbroker = "rabit"\n',
            "router.toml:8: queue[0].broker: 'rabit' is not the name of a [[connector]] with"
            " role = \"broker\" (brokers here: 'rabbit'); add one, or correct the name",
        ),
        (
            BROKER + '[[queue]]\nprefix = "jobs"\nbroker = "rabbit"\nmax_depth = 5\ndead_letter = "d"\n',
            "router.toml:6: queue[0]: dead_letter, max_depth: limits of the embedded store, which does not"
            " keep a broker's queues (the broker's own policies apply); remove them here",
        ),
        (
            '[[queue]]\nprefix = "jobs"\nbroker_prefix = "/queue/"\n',
            "router.toml:1: queue[0]: broker_prefix is for queues served by a broker;"
            ' add broker = "<connector name>"',
        ),
    ],
)
def test_broker_tables_are_checked(tmp_path, text, message):
    assert load_error(tmp_path, text) == message

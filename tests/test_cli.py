import io
import sys
import types

import pytest

from meshbus import __version__
from meshbus.cli import main
from meshbus.config import ListenerConfig, RouterConfig
from meshbus.users import UserDatabase


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def started(monkeypatch):
    """The configurations `meshbus router` would have run; no server starts."""
    configs: list[RouterConfig] = []

    def run(config: RouterConfig) -> int:
        configs.append(config)
        return 3

    monkeypatch.setitem(sys.modules, "meshbus.amqp.server", types.SimpleNamespace(run=run))
    return configs


def add(monkeypatch, path, user, stdin_text):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    return main(["users", "add", str(path), user])


def test_users_add_reads_the_first_line_of_stdin(tmp_path, monkeypatch):
    path = tmp_path / "users.txt"
    assert add(monkeypatch, path, "alice", "wonder land\r\nignored\n") == 0
    assert UserDatabase.load(path).verify("alice", "wonder land")


def test_users_add_prompts_twice_on_a_terminal(tmp_path, monkeypatch):
    prompts = []

    def getpass(prompt):
        prompts.append(prompt)
        return "secret"

    monkeypatch.setattr(sys, "stdin", FakeTerminal())
    monkeypatch.setattr("getpass.getpass", getpass)
    assert main(["users", "add", str(tmp_path / "users.txt"), "alice"]) == 0
    assert prompts == ["Password for alice: ", "Again: "]
    assert UserDatabase.load(tmp_path / "users.txt").verify("alice", "secret")


def test_users_add_refuses_differing_passwords(tmp_path, monkeypatch, capsys):
    answers = iter(["secret", "sercet"])
    monkeypatch.setattr(sys, "stdin", FakeTerminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["users", "add", str(tmp_path / "users.txt"), "alice"]) == 1
    assert capsys.readouterr().err == "meshbus: error: the passwords differ; nothing changed\n"
    assert not (tmp_path / "users.txt").exists()


def test_users_add_refuses_an_empty_password(tmp_path, monkeypatch, capsys):
    assert add(monkeypatch, tmp_path / "users.txt", "alice", "\n") == 1
    assert capsys.readouterr().err == "meshbus: error: empty password; nothing changed\n"


def test_users_add_refuses_a_bad_name(tmp_path, monkeypatch, capsys):
    assert add(monkeypatch, tmp_path / "users.txt", "al:ice", "pw\n") == 1
    assert capsys.readouterr().err.startswith("meshbus: error: invalid user name 'al:ice'")


def test_users_list_and_remove(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users.txt"
    add(monkeypatch, path, "alice", "a\n")
    add(monkeypatch, path, "bob", "b\n")
    assert main(["users", "remove", str(path), "alice"]) == 0
    assert main(["users", "list", str(path)]) == 0
    assert capsys.readouterr().out == "bob\n"


def test_users_remove_unknown_user(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users.txt"
    add(monkeypatch, path, "bob", "b\n")
    assert main(["users", "remove", str(path), "alice"]) == 1
    assert capsys.readouterr().err == (
        f"meshbus: error: {path}: no user 'alice'; 'meshbus users list {path}' shows them\n"
    )


def test_users_list_missing_file(tmp_path, capsys):
    assert main(["users", "list", str(tmp_path / "users.txt")]) == 1
    assert capsys.readouterr().err == (
        f"meshbus: error: {tmp_path}/users.txt: no such users file; create it with 'meshbus users add'\n"
    )


def test_router_runs_the_default_config(started):
    assert main(["router"]) == 3
    assert [config.listener for config in started] == [[ListenerConfig()]]


def test_router_applies_listen_and_log_level_overrides(tmp_path, started):
    path = tmp_path / "router.toml"
    path.write_text('[router]\nid = "a"\n\n[[listener]]\nport = 1\nlink_capacity = 9\n')
    assert main(["router", "--config", str(path), "--listen", "0.0.0.0:0", "--listen", "[::1]:5673"]) == 3
    assert main(["router", "--config", str(path), "--log-level", "debug"]) == 3
    overridden, logged = started
    assert overridden.router.id == "a"
    assert overridden.listener == [
        ListenerConfig(host="0.0.0.0", port=0),
        ListenerConfig(host="::1", port=5673),
    ]
    assert logged.router.log_level == "debug"
    assert logged.listener == [ListenerConfig(port=1, link_capacity=9)]


def test_router_config_error_exits_2_without_traceback(tmp_path, started, capsys):
    path = tmp_path / "router.toml"
    path.write_text("[[listener]]\nport = 70000\n")
    assert main(["router", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"meshbus: error: {path}:2: listener[0].port: Input should be less than or equal to 65535"
        " (got 70000)\n"
    )
    assert started == []


@pytest.mark.parametrize("listen", ["5672", ":5672", "host:port", "host:70000"])
def test_router_rejects_a_bad_listen_address(listen, started, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["router", "--listen", listen])
    assert caught.value.code == 2
    assert (
        f"argument --listen: expected HOST:PORT with PORT in 0..65535, got {listen!r}"
        in capsys.readouterr().err
    )
    assert started == []


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"meshbus {__version__}\n"


def test_store_listens_only_where_its_config_says_and_needs_a_way_to_the_mesh(tmp_path, started, capsys):
    path = tmp_path / "store.toml"
    path.write_text('[router]\nid = "s"\n\n[[connector]]\nhost = "10.0.0.1"\nport = 5673\n')
    assert main(["store", "--config", str(path)]) == 3
    (config,) = started
    assert (config.listener, config.store.enabled) == ([], True)
    path.write_text('[router]\nid = "s"\n')
    assert main(["store", "--config", str(path)]) == 1
    assert "add a [[connector]]" in capsys.readouterr().err
    path.write_text('[store]\nenabled = false\n\n[[listener]]\nrole = "inter-router"\n')
    assert main(["store", "--config", str(path)]) == 1
    assert "[store] enabled is false" in capsys.readouterr().err

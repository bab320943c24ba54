import base64
import hashlib
import re
import stat

import pytest

from meshbus import users
from meshbus.users import UserDatabase, UsersError, add_user, remove_user


def cheap_line(name: str, password: str, salt: bytes = b"0123456789abcdef") -> str:
    """A users-file line with tiny costs, computed here independently of the module."""
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2, r=1, p=1, dklen=32)
    return f"{name}:scrypt:2:1:1:{base64.b64encode(salt).decode()}:{base64.b64encode(digest).decode()}\n"


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text(
        "# meshbus users\n\n"
        + cheap_line("alice", "wonderland")
        + "  # bob left\n"
        + cheap_line("carol", "pw")
    )
    return path


def test_verify_accepts_only_the_right_password(users_file):
    database = UserDatabase.load(users_file)
    assert database.verify("alice", "wonderland")
    assert database.verify("carol", "pw")
    assert not database.verify("alice", "pw")
    assert not database.verify("alice", "")
    assert not database.verify("mallory", "wonderland")


def test_names_in_file_order_without_comments(users_file):
    assert UserDatabase.load(users_file).names == ["alice", "carol"]


def test_unknown_user_costs_a_hash_too(users_file, monkeypatch):
    database = UserDatabase.load(users_file)
    hashed = []
    real_scrypt = users._scrypt

    def counting_scrypt(password, *costs):
        hashed.append(password)
        return real_scrypt(password, *costs)

    monkeypatch.setattr(users, "_scrypt", counting_scrypt)
    assert not database.verify("mallory", "guess")
    assert hashed == ["guess"]


def test_add_user_creates_a_private_file_with_a_scrypt_line(tmp_path):
    path = tmp_path / "users.txt"
    add_user(path, "alice", "wonderland")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"alice:scrypt:16384:8:1:[A-Za-z0-9+/]{22}==:[A-Za-z0-9+/]{43}=\n", path.read_text())
    assert UserDatabase.load(path).verify("alice", "wonderland")


def test_add_user_uses_a_new_salt_each_time(tmp_path):
    add_user(tmp_path / "one", "alice", "same")
    add_user(tmp_path / "two", "alice", "same")
    assert (tmp_path / "one").read_text() != (tmp_path / "two").read_text()


def test_add_user_replaces_the_line_and_keeps_the_rest(users_file):
    users_file.chmod(0o640)
    before = users_file.read_text().splitlines()
    add_user(users_file, "alice", "looking-glass")
    after = users_file.read_text().splitlines()
    assert [after[i] for i in (0, 1, 3, 4)] == [before[i] for i in (0, 1, 3, 4)]
    assert after[2].startswith("alice:scrypt:16384:")
    database = UserDatabase.load(users_file)
    assert database.verify("alice", "looking-glass")
    assert not database.verify("alice", "wonderland")
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640


def test_add_user_appends_a_new_user(users_file):
    users_file.write_text(users_file.read_text().rstrip("\n"))  # no newline at the end
    add_user(users_file, "dave", "secret")
    assert UserDatabase.load(users_file).names == ["alice", "carol", "dave"]


@pytest.mark.parametrize("name", ["", "a:b", "a b", "tab\there", "#alice"])
def test_add_user_rejects_bad_names(tmp_path, name):
    with pytest.raises(UsersError, match=r"invalid user name .*: use no ':' or whitespace"):
        add_user(tmp_path / "users.txt", name, "pw")
    assert not (tmp_path / "users.txt").exists()


def test_add_user_refuses_to_rewrite_a_malformed_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("garbage\n")
    with pytest.raises(UsersError, match=r"users.txt:1: expected"):
        add_user(path, "alice", "pw")
    assert path.read_text() == "garbage\n"


def test_remove_user(users_file):
    assert remove_user(users_file, "alice")
    assert UserDatabase.load(users_file).names == ["carol"]
    assert users_file.read_text().startswith("# meshbus users\n\n  # bob left\n")
    assert not remove_user(users_file, "alice")


def test_missing_file(tmp_path):
    message = f"{tmp_path}/users.txt: no such users file; create it with 'meshbus users add'"
    with pytest.raises(UsersError, match=f"^{re.escape(message)}$"):
        UserDatabase.load(tmp_path / "users.txt")
    with pytest.raises(UsersError, match=f"^{re.escape(message)}$"):
        remove_user(tmp_path / "users.txt", "alice")


GOOD = cheap_line("alice", "pw").strip()
SALT, DIGEST = GOOD.split(":")[5:]
BAD_COSTS = (
    "n must be a power of 2 above 1, r and p positive, 128 * n * r at most 268435456 bytes"
    " and the hash not empty; set the password again with 'meshbus users add'"
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "alice:pw",
            "expected name:scrypt:n:r:p:salt:hash, found 2 fields; set the password again with"
            " 'meshbus users add'",
        ),
        (f"al ice:scrypt:2:1:1:{SALT}:{DIGEST}", "invalid user name 'al ice'"),
        (f"alice:bcrypt:2:1:1:{SALT}:{DIGEST}", "unknown password scheme 'bcrypt'; only 'scrypt' is known"),
        (f"alice:scrypt:two:1:1:{SALT}:{DIGEST}", "n, r, p must be integers and salt, hash base64"),
        (f"alice:scrypt:2:1:1:{SALT}:not*base64", "n, r, p must be integers and salt, hash base64"),
        (f"alice:scrypt:3:1:1:{SALT}:{DIGEST}", BAD_COSTS),
        (f"alice:scrypt:2:0:1:{SALT}:{DIGEST}", BAD_COSTS),
        (f"alice:scrypt:2:1:0:{SALT}:{DIGEST}", BAD_COSTS),
        (f"alice:scrypt:{2**30}:8:1:{SALT}:{DIGEST}", BAD_COSTS),
        (f"alice:scrypt:2:1:1:{SALT}:", BAD_COSTS),
        (GOOD, "'alice' is also on line 1; remove one of the lines"),
    ],
)
def test_malformed_line_is_named(tmp_path, line, message):
    path = tmp_path / "users.txt"
    path.write_text(f"{GOOD}\n# comment\n{line}\n")
    with pytest.raises(UsersError) as caught:
        UserDatabase.load(path)
    assert str(caught.value).startswith(f"{path}:3: {message}")

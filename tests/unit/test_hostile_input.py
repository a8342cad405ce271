"""Hostile input through the real commands: one line on stderr, the documented
exit status, no traceback, no hang, nothing half-written.

Every run has a timeout (a FIFO read would block forever) and the ones that
could read without end (/dev/zero) a cap on their address space, so that a
regression fails the test quickly instead of hanging CI or eating the machine.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import resource
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, run_cli, run_engine, tokenlife_bin, write_cli_site
from tests.unit.test_engine_cli import STEP, Node, make_token

#: address space for a command that must not read without end: enough to run
#: tokenlife, far too little to hold /dev/zero
MEMORY_LIMIT = 2 << 30
DURATION_HINT = "is not a duration such as 90, 30m, 1h, 2d or 1w"


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def tokenlife(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``run_cli`` with a short timeout and a memory cap."""
    full = {k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"}
    full.update(env or {})
    return subprocess.run(
        [tokenlife_bin(), *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=30,
        preexec_fn=_limited,
        check=False,
    )


def engine(
    node: Node, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tokenlife-engine`` as Node.run does, with a memory cap."""
    return run_engine(node.config, *args, env=env, preexec_fn=_limited)


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), text[:2000]
    assert "Traceback" not in text
    return text[:-1]


def _user() -> str:
    """An ordinary user this process may mint for: itself, or nobody as root."""
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site config delivering to local "nodes" under tmp_path/nodes."""
    return write_cli_site(
        tmp_path,
        secrets.token_bytes(32),
        f'[delivery]\ntransport = "local"\nroot = "{tmp_path}/nodes"\njob_timeout = "5"\n',
    )


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    yield path


# -- 2. push --job (PrologSlurmctld) exits 0 whatever SLURM_JOB_NODELIST holds ---------------


@pytest.mark.parametrize(
    ("nodelist", "reason"),
    [
        ("n[1-99999][1-99999]", "names more than 100000 hosts"),
        ("n[1-2]" * 20000, "names more than 100000 hosts"),
        ("a[1-400],b[1-400][1-400]", "names more than 100000 hosts"),
        ("n[1-99999999]", "names more than 100000 hosts"),
        ("x" * 120000 + "[1-99999]", "characters"),
        ("n[" + "9" * 5000 + "]", "bad range"),
        ("n[١-٣]", "bad range"),
        ("n[1-3", "unbalanced '['"),
        ("n[[1]]", "nested brackets"),
        ("[", "unbalanced '['"),
        (",", "empty host name"),
        ("n[3-1]", "descending range"),
    ],
)
def test_push_job_exits_0_on_any_nodelist(site: Path, nodelist: str, reason: str) -> None:
    env = {"SLURM_JOB_USER": _user(), "SLURM_JOB_NODELIST": nodelist}
    result = run_cli("-c", str(site), "push", "--job", env=env)
    line = one_line(result.stderr)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr[:2000]
    assert line.startswith("tokenlife-push: SLURM_JOB_NODELIST: ") and reason in line
    assert len(line) < 300  # the hostlist is shortened in the message
    assert not (site.parent / "nodes").exists()


def test_push_job_with_many_bracket_groups_does_not_recurse(site: Path) -> None:
    """40000 groups of one number: one valid host name, no RecursionError."""
    env = {"SLURM_JOB_USER": _user(), "SLURM_JOB_NODELIST": "n" + "[1]" * 40000}
    result = run_cli("-c", str(site), "push", "--job", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "RecursionError" not in result.stderr and "unexpected" not in result.stderr


HOG = """
import sys
import transfer.jobs


def hog(expression):  # fills the memory as the old expand did with n[1-99999][1-99999]
    chain = None
    while True:  # small objects only: nothing is left when MemoryError comes
        chain = (chain, "n" * 64 + str(id(chain)))


transfer.jobs.expand = hog
from tokenlife.app.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_push_job_exits_0_when_memory_runs_out(site: Path) -> None:
    """The MemoryError's traceback pinned the memory, so printing it raised a
    second MemoryError past every handler: exit 1 with a traceback (about 2
    runs in 3 before the fix, depending on what memory was left)."""
    env = {**os.environ, "SLURM_JOB_USER": _user(), "SLURM_JOB_NODELIST": "n1"}
    env.pop("TOKENLIFE_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-c", HOG, "-c", str(site), "push", "--job"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=_limited,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stderr[-3000:]
    assert one_line(result.stderr) == "tokenlife-push: out of memory"


# -- 3. a deeply nested or oversized SLURM_JWT payload ---------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(payload: bytes) -> str:
    return f"{_b64(b'{}')}.{_b64(payload)}.{_b64(os.urandom(32))}"


#: SLURM_JWT values that once made json.loads raise RecursionError (all within
#: the size a token may have), and one far beyond that size
NESTED = {
    "arrays": _jwt(b"[" * 5000 + b"]" * 5000),
    "objects": _jwt(b'{"a":' * 1500 + b"1" + b"}" * 1500),
    "in-a-claim": _jwt(b'{"sun":"x","exp":1,"id":' + b"[" * 4000 + b"]" * 4000 + b"}"),
    "oversized": _jwt(json.dumps({"sun": "x", "exp": 2**40, "pad": "p" * 90000}).encode()),
}


@pytest.fixture(params=sorted(NESTED))
def bad_jwt(request: pytest.FixtureRequest) -> str:
    return NESTED[request.param]


def test_engine_token_refuses_a_nested_slurm_jwt(node: Node, bad_jwt: str) -> None:
    result = engine(node, "token", env={"SLURM_JWT": bad_jwt})
    assert (result.returncode, result.stdout) == (1, "")
    assert one_line(result.stderr).startswith("tokenlife-engine: ")


def test_engine_exec_refuses_a_nested_slurm_jwt(node: Node, bad_jwt: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = engine(node, "exec", "--", "touch", str(marker), env={"SLURM_JWT": bad_jwt})
    assert result.returncode == 1 and not marker.exists()
    assert one_line(result.stderr).startswith("tokenlife-engine: ")


def test_engine_token_and_exec_use_the_delivered_token_despite_it(node: Node, bad_jwt: str) -> None:
    token = node.deliver(make_token())
    result = engine(node, "token", env={"SLURM_JWT": bad_jwt})
    assert (result.returncode, result.stdout, result.stderr) == (0, token + "\n", "")
    result = engine(
        node, "exec", "--", "sh", "-c", 'printf %s "$SLURM_JWT"', env={"SLURM_JWT": bad_jwt}
    )
    assert (result.returncode, result.stdout) == (0, token)


def test_engine_env_exports_the_delivered_token_despite_it(node: Node, bad_jwt: str) -> None:
    token = node.deliver(make_token())
    result = engine(node, "env", env={"SLURM_JWT": bad_jwt, **STEP})
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"export SLURM_JWT_FILE={node.file}",
        f"export SLURM_JWT={token}",
    ]
    result = engine(node, "env", env={"SLURM_JWT": bad_jwt})  # the batch step
    assert result.stdout.splitlines() == [f"export SLURM_JWT_FILE={node.file}", "unset SLURM_JWT"]


def test_engine_run_refuses_a_nested_slurm_jwt(node: Node, bad_jwt: str) -> None:
    token = node.deliver(make_token())
    result = engine(
        node, "run", "--", "sh", "-c", 'cat "$SLURM_JWT_FILE"', env={"SLURM_JWT": bad_jwt}
    )
    assert (result.returncode, result.stdout) == (0, token), result.stderr
    assert "Traceback" not in result.stderr


def test_engine_refuses_a_delivered_file_with_a_nested_payload(node: Node, bad_jwt: str) -> None:
    node.deliver(bad_jwt)
    result = engine(node, "token")
    assert (result.returncode, result.stdout) == (1, "")
    line = one_line(result.stderr)
    assert line.startswith(f"tokenlife-engine: {node.file}: ")
    assert "not a JSON Web Token" in line or "too big" in line
    result = engine(node, "env", env=STEP)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"print tokenlife-engine: no token for this job: {node.file}: ")


def test_engine_env_prefers_the_delivered_token_to_a_longer_inherited_one(node: Node) -> None:
    """An inherited token that outlives the delivered one: the file is still exported."""
    token = node.deliver(make_token(ttl=600))
    inherited = make_token(ttl=3000)
    result = engine(node, "env", env={"SLURM_JWT": inherited, **STEP})
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"export SLURM_JWT_FILE={node.file}",
        f"export SLURM_JWT={token}",
    ]
    result = engine(node, "env", env={"SLURM_JWT": inherited})
    assert result.stdout.splitlines() == [f"export SLURM_JWT_FILE={node.file}", "unset SLURM_JWT"]


@pytest.mark.parametrize("job_uid", ["²", "١", "9" * 5000])
def test_engine_refuses_a_job_uid_that_is_not_ascii_digits(node: Node, job_uid: str) -> None:
    result = engine(node, "token", env={"SLURM_JOB_UID": job_uid})
    assert result.returncode == 1 and "is not a uid" in one_line(result.stderr)


# -- 4. a FIFO, /dev/zero or an oversized file as key, -c config or TOKENLIFE_CONFIG ----------


def _config_check(config: Path, how: str) -> subprocess.CompletedProcess[str]:
    if how == "-c":
        return tokenlife("-c", str(config), "config", "check")
    return tokenlife("config", "check", env={"TOKENLIFE_CONFIG": str(config)})


@pytest.mark.parametrize("how", ["-c", "TOKENLIFE_CONFIG"])
def test_config_that_is_a_fifo(fifo: Path, how: str) -> None:
    result = _config_check(fifo, how)
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == f"tokenlife-config: {fifo}: not a regular file"


@pytest.mark.parametrize("how", ["-c", "TOKENLIFE_CONFIG"])
def test_config_that_is_dev_zero(how: str) -> None:
    result = _config_check(Path("/dev/zero"), how)
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == "tokenlife-config: /dev/zero: not a regular file"


def test_config_that_is_too_big(tmp_path: Path) -> None:
    config = tmp_path / "big.toml"
    config.write_text("# padding\n" * 200_000)
    result = _config_check(config, "-c")
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == f"tokenlife-config: {config}: larger than 1 MiB"


def test_config_nested_too_deeply(tmp_path: Path) -> None:
    """tomllib recurses once per nesting level: RecursionError, not a traceback."""
    config = tmp_path / "deep.toml"
    config.write_text("[engine]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    result = _config_check(config, "-c")
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == f"tokenlife-config: {config}: invalid TOML: nested too deeply"
    node = Node(tmp_path / "node")
    result = engine(node, "token", env={"TOKENLIFE_CONFIG": str(config)})
    assert one_line(result.stderr) == f"tokenlife-engine: {config}: invalid TOML: nested too deeply"
    assert result.returncode == 2


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    result = _config_check(tmp_path, "-c")
    assert one_line(result.stderr) == f"tokenlife-config: {tmp_path}: is a directory"
    assert result.returncode == 2


def _key_site(tmp_path: Path, key: Path) -> Path:
    config = write_cli_site(tmp_path, secrets.token_bytes(32))
    config.write_text(config.read_text().replace(str(tmp_path / "k"), str(key)))
    return config


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "big"])
def test_key_file_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        key = tmp_path / "key.fifo"
        os.mkfifo(key, 0o600)
        reason = f"key file {key} is not a regular file"
    elif kind == "dev-zero":
        key = Path("/dev/zero")
        reason = "key file /dev/zero is not a regular file"
    else:
        key = tmp_path / "key.big"
        key.write_bytes(os.urandom(2 << 20))
        key.chmod(0o600)
        reason = f"key file {key} is larger than 1 MiB"
    config = _key_site(tmp_path, key)
    result = tokenlife("-c", str(config), "mint", "--local", _user())
    assert (result.returncode, result.stdout) == (3, "")
    assert one_line(result.stderr) == f"tokenlife-mint: {reason}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "db").exists()
    result = tokenlife("-c", str(config), "config", "check")
    assert result.returncode == 1 and f"problem: key: {reason}\n" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "big"])
def test_engine_config_that_is_not_a_small_regular_file(node: Node, kind: str) -> None:
    if kind == "fifo":
        config = node.config.parent / "engine.fifo"
        os.mkfifo(config, 0o644)
        reason = f"{config}: not a regular file"
    elif kind == "dev-zero":
        config = Path("/dev/zero")
        reason = "/dev/zero: not a regular file"
    else:
        config = node.config.parent / "big.toml"
        config.write_text("[engine]\n" + "# padding\n" * 200_000)
        reason = f"{config}: larger than 1 MiB"
    env = {"TOKENLIFE_CONFIG": str(config)}
    result = engine(node, "env", env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[0] == f"print tokenlife-engine: {reason}; using the defaults"
    result = engine(node, "token", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == f"tokenlife-engine: {reason}"


# -- 6. revoke when the login token file is not a file -----------------------------------------


class Revoke:
    def __init__(self, root: Path) -> None:
        require_root()  # the login file belongs to its user: minting for nobody needs root
        self.config = write_cli_site(root, secrets.token_bytes(32))
        self.root = root
        result = run_cli("-c", str(self.config), "mint", "--local", "nobody")
        assert result.returncode == 0, result.stderr
        self.user_dir = root / "run" / str(pwd.getpwnam("nobody").pw_uid)
        self.file = self.user_dir / "slurm_jwt"
        assert self.file.is_file()

    def revoke(self) -> subprocess.CompletedProcess[str]:
        return run_cli("-c", str(self.config), "revoke", "nobody")


def test_revoke_when_the_login_file_is_a_directory(tmp_path: Path) -> None:
    site = Revoke(tmp_path)
    site.file.unlink()
    site.file.mkdir()
    (site.file / "mine").write_text("the user's own file")
    result = site.revoke()
    assert result.returncode == 0
    assert result.stdout == "revoked 1 token(s) of nobody\n"
    assert one_line(result.stderr) == (
        f"tokenlife-revoke: warning: {site.file} is a directory, not a token file: left in place"
    )
    assert (site.file / "mine").read_text() == "the user's own file"
    again = site.revoke()  # the revocation was committed
    assert (again.returncode, again.stderr) == (1, "tokenlife-revoke: nobody has no active token\n")


def test_revoke_removes_a_symlink_never_its_target(tmp_path: Path) -> None:
    site = Revoke(tmp_path)
    target = tmp_path / "precious"
    target.write_text("not yours to delete")
    site.file.unlink()
    site.file.symlink_to(target)
    result = site.revoke()
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "revoked 1 token(s) of nobody; removed its token file\n"
    assert not site.file.is_symlink() and target.read_text() == "not yours to delete"


def test_revoke_does_not_follow_a_symlinked_user_directory(tmp_path: Path) -> None:
    site = Revoke(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    site.user_dir.rename(elsewhere)
    site.user_dir.symlink_to(elsewhere)
    result = site.revoke()
    assert result.returncode == 0 and result.stdout == "revoked 1 token(s) of nobody\n"
    assert "warning" in one_line(result.stderr) and str(site.user_dir) in result.stderr
    assert (elsewhere / "slurm_jwt").is_file()


def test_revoke_says_it_revoked_even_when_the_token_file_cannot_be_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only file system, say: exit 1, after the line that says it is revoked."""
    import errno

    from tokenlife import fsutil
    from tokenlife.app.parser import run

    site = Revoke(tmp_path)

    def read_only(path: Path) -> bool:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(fsutil, "remove_file", read_only)
    assert run(["-c", str(site.config), "revoke", "nobody"]) == 1
    out, err = capsys.readouterr()
    assert out == "revoked 1 token(s) of nobody\n"
    reason = "Read-only file system"
    assert err == f"tokenlife-revoke: the token file {site.file} could not be removed: {reason}\n"
    assert site.file.is_file()
    again = site.revoke()
    assert (again.returncode, again.stderr) == (1, "tokenlife-revoke: nobody has no active token\n")


# -- 7. durations with digits other than ASCII ---------------------------------------------------


@pytest.mark.parametrize("value", ["١٢h", "１２h", "۳m", "1²"])
def test_mint_lifetime_with_non_ascii_digits(tmp_path: Path, value: str) -> None:
    config = write_cli_site(tmp_path, secrets.token_bytes(32))
    result = tokenlife("-c", str(config), "mint", "--local", _user(), "--lifetime", value)
    assert (result.returncode, result.stdout) == (2, "")
    line = one_line(result.stderr)
    assert line.startswith(f"tokenlife-mint: argument --lifetime: {value!r} {DURATION_HINT}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "db").exists()


@pytest.mark.parametrize("value", ["١٢h", "１２h"])
def test_config_duration_with_non_ascii_digits(tmp_path: Path, value: str) -> None:
    config = write_cli_site(tmp_path, secrets.token_bytes(32), f'[token]\nlifetime = "{value}"\n')
    result = tokenlife("-c", str(config), "config", "check")
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        one_line(result.stderr)
        == f"tokenlife-config: {config}: token.lifetime: {value!r} {DURATION_HINT}"
    )


def test_engine_duration_with_non_ascii_digits(node: Node) -> None:
    node.config.write_text(f'[engine]\ntoken_dir = "{node.token_dir}"\nadvisory_window = "١٥m"\n')
    result = engine(node, "token")
    assert result.returncode == 2
    assert "engine.advisory_window: '١٥m' is not a duration" in one_line(result.stderr)

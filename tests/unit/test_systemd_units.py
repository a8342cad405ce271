"""The shipped systemd units, tmpfiles/sysusers snippets and PAM line.

Everything here runs without systemd as PID 1 (CI has none): ``systemd-analyze
verify`` and ``systemd-analyze security --offline=true`` load unit files in a
private manager of their own, ``systemd-tmpfiles`` and ``systemd-sysusers``
work on a ``--root`` directory.

``verify`` checks that every ``Exec*=`` binary exists.  The units name the
installed path (``/usr/local/bin/tokenlife``, pip's console script), which a
test checkout does not have, so ``verify`` runs on copies in which that one
path, and nothing else, is replaced by this checkout's console script (a test
below checks that every tokenlife invocation uses exactly that path, so the
rewrite covers them all).  ``security --offline=true`` does not look at the
binary and runs on the shipped files themselves.

``verify`` reports unknown or unparsable settings as warnings but still exits
0, so the tests also require that it says nothing about our units; a negative
control makes sure such a warning is indeed caught.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import stat
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool, tokenlife_bin
from tokenlife import config as configmod

SYSTEMD = REPO / "systemd"
UNIT_SUFFIXES = {".service", ".timer", ".socket", ".path", ".target"}
UNITS = sorted(p for p in SYSTEMD.iterdir() if p.suffix in UNIT_SUFFIXES)
SERVICES = [p for p in UNITS if p.suffix == ".service"]
# The template that runs change hooks (docs/hooks.md) runs as the account it
# watches for, with no capabilities: the rules of the tokenlife account's
# services below do not apply to it; its own tests are at the end.
WATCH_UNIT = SYSTEMD / "tokenlife-watch@.service"
ACCOUNT_SERVICES = [p for p in SERVICES if p != WATCH_UNIT]
PAM_FILE = SYSTEMD / "pam.d" / "tokenlife"
TMPFILES = SYSTEMD / "tokenlife.tmpfiles.conf"
SYSUSERS = SYSTEMD / "tokenlife.sysusers.conf"

SHIPPED_BIN = "/usr/local/bin/tokenlife"
SHIPPED_ENGINE = "/usr/local/bin/tokenlife-engine"
MAX_EXPOSURE = 2.0
# The only capabilities the services hold, and why (docs/systemd.md has more).
CAPABILITIES = {
    "CAP_CHOWN": "give each token file and its directory to the user",
    "CAP_FOWNER": "fchmod the file after it became the user's",
    "CAP_DAC_OVERRIDE": "write in the users' 0700 directories; read slurm's 0600 key",
}
# Checks of `systemd-analyze security` the services knowingly fail, and why.
# Any other failing check makes the test fail: hardening only gets weaker on
# purpose.
ACCEPTED_EXPOSURES = {
    "SystemCallFilter=~@privileged": "fchown is allowed back (CAP_CHOWN needs it)",
    "RootDirectory=/RootImage=": "runs in the host's tree (python, site packages, /etc)",
    "AmbientCapabilities=": "the three capabilities above, for a non-root user",
    "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)": "CAP_DAC_OVERRIDE, CAP_FOWNER",
    "CapabilityBoundingSet=~CAP_(CHOWN|FSETID|SETFCAP)": "CAP_CHOWN",
    "RestrictAddressFamilies=~AF_UNIX": "mint socket, sd_notify, nss (sssd), PostgreSQL",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "PostgreSQL, AWS, SSH to the nodes",
    "PrivateNetwork=": "same",
    "IPAddressDeny=": "peers are site-specific (a drop-in can add an allow list)",
    "PrivateUsers=": "files are chowned to real users, not mappable in a user namespace",
    "DeviceAllow=": "char-rtc:r, implied by ProtectClock=yes",
}
# Settings that differ between the daemon and the oneshot on purpose; every
# other [Service] setting (the sandbox) must be the same in both.
PER_SERVICE_KEYS = {
    "Type",
    "NotifyAccess",
    "ExecStart",
    "ExecReload",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "WatchdogSec",
    "TimeoutStartSec",
    "TimeoutStopSec",
}


def _name(path: Path) -> str:
    return path.name


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit-style file as (key, value) lists; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, eq, value = line.partition("=")
        assert eq, f"{path}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(path).get(section, []) if k == key]


def value(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= set {len(found)} times"
    return found[0]


def words(path: Path, section: str, key: str) -> set[str]:
    return {w for v in values(path, section, key) for w in v.split()}


def is_true(text: str) -> bool:
    return text.lower() in ("1", "yes", "y", "true", "t", "on")


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", **(env or {})},
    )


def test_the_units_are_there() -> None:
    # Guards the parametrized tests below against an empty glob.
    assert {p.name for p in UNITS} >= {
        "tokenlife.service",
        "tokenlife-renew.service",
        "tokenlife-renew.timer",
        "tokenlife-push.service",
        "tokenlife-push.timer",
    }


# --- systemd-analyze verify -------------------------------------------------


def stage(directory: Path, rewrite: dict[str, str] | None = None) -> Path:
    """Copies of all units with the installed binary path swapped for this checkout's."""
    directory.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        text = unit.read_text().replace(SHIPPED_BIN, tokenlife_bin())
        for old, new in (rewrite or {}).items():
            text = text.replace(old, new)
        (directory / unit.name).write_text(text)
    return directory


def verify_problems(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about our units (its exit status included)."""
    require_tool("systemd-analyze")
    result = run("systemd-analyze", "verify", "--man=no", str(unit))
    lines = (result.stdout + result.stderr).splitlines()
    # Only lines about our units: other installed units are not ours to judge.
    problems = [line for line in lines if "tokenlife" in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {lines}")
    return problems


@pytest.mark.parametrize("unit", UNITS, ids=_name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    staged = stage(tmp_path / "units") / unit.name
    assert verify_problems(staged) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ProtectSystem=strict", "ProtectSystm=strict"),  # a typo: exit status 0, one warning
        ("ProtectHome=yes", "ProtectHome=maybe"),  # a bad value: exit status 0, one warning
        ("tokenlife serve", "tokenlife-missing serve"),  # a missing binary: exit status 1
    ],
)
def test_verify_catches_mistakes(old: str, new: str, tmp_path: Path) -> None:
    staged = stage(tmp_path / "units", {old: new}) / "tokenlife.service"
    assert new in staged.read_text()
    assert verify_problems(staged) != []


def tokenlife_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv) of every tokenlife command the units and the PAM line run."""
    found: list[tuple[str, list[str]]] = []
    for unit in UNITS:
        for key, val in parse_unit(unit).get("Service", []):
            if key.startswith("Exec") and "tokenlife" in val:
                if shlex.split(val.lstrip("-@:+!"))[0] == SHIPPED_ENGINE:
                    continue  # the engine: see test_watch_unit_runs_the_engine_as_the_instance_user
                found.append((f"{unit.name} {key}", shlex.split(val.lstrip("-@:+!"))))
    module, pam_exec = pam_lines()
    # The module runs its fallback= as "PROGRAM pam --no-service".
    fallback = next(w for w in module if w.startswith("fallback=")).partition("=")[2]
    found.append((f"{PAM_FILE.name} (module)", [fallback, "pam", "--no-service"]))
    start = next(i for i, w in enumerate(pam_exec) if "tokenlife" in w)
    found.append((f"{PAM_FILE.name} (pam_exec)", pam_exec[start:]))
    return found


def pam_lines() -> tuple[list[str], list[str]]:
    """The PAM file's active line (the module) and its commented-out pam_exec line."""
    lines = PAM_FILE.read_text().splitlines()
    (active,) = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    (other,) = [line[1:] for line in lines if line.startswith("#session")]
    module = shlex.split(active)
    assert module[:3] == ["session", "optional", "pam_tokenlife.so"], module
    pam_exec = shlex.split(other)
    assert pam_exec[:3] == ["session", "optional", "pam_exec.so"], pam_exec
    return module, pam_exec


def test_every_invocation_uses_the_installed_path() -> None:
    invocations = tokenlife_invocations()
    assert len(invocations) >= 3  # serve, renew, pam
    for where, argv in invocations:
        assert argv[0] == SHIPPED_BIN, where


@cache
def help_text(*args: str) -> str:
    result = run(tokenlife_bin(), *args, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_invocations_name_real_commands_and_options() -> None:
    commands = set(re.findall(r"^ {4}([a-z][a-z-]*)(?:\s|$)", help_text(), re.MULTILINE))
    assert {"serve", "renew", "pam"} <= commands  # the parse found the list
    for where, argv in tokenlife_invocations():
        rest = argv[1:]
        while rest and rest[0].startswith("-"):  # global options: -c FILE, -v
            rest = rest[2:] if rest[0] in ("-c", "--config") else rest[1:]
        assert rest, f"{where}: no command"
        command, options = rest[0], [a.split("=")[0] for a in rest[1:] if a.startswith("-")]
        assert command in commands, f"{where}: {command!r} is not a tokenlife command"
        for option in options:
            assert re.search(rf"(^|[\s\[]){re.escape(option)}\b", help_text(command)), (
                f"{where}: tokenlife {command} has no {option}"
            )


# --- systemd-analyze security --offline=true --------------------------------


@pytest.mark.parametrize("unit", SERVICES, ids=_name)
def test_security_exposure(unit: Path) -> None:
    require_tool("systemd-analyze")
    threshold = round(MAX_EXPOSURE * 10)  # --threshold counts tenths: 20 means 2.0
    result = run(
        "systemd-analyze", "security", "--offline=true", f"--threshold={threshold}", str(unit)
    )
    found = re.search(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    # A template is analysed as its instance "i".
    assert found[1] == unit.name.replace("@.", "@i.")
    assert float(found[2]) <= MAX_EXPOSURE, f"{unit.name}: exposure {found[2]}"
    assert found[3] == "OK"
    assert result.returncode == 0, result.stderr
    assert "tokenlife" not in result.stderr, result.stderr


@pytest.mark.parametrize("unit", SERVICES, ids=_name)
def test_only_accepted_exposures(unit: Path) -> None:
    require_tool("systemd-analyze")
    result = run("systemd-analyze", "security", "--offline=true", "--json=short", str(unit))
    assert result.returncode == 0, result.stderr
    checks = json.loads(result.stdout)
    assert len(checks) > 50
    failing = {c["name"] for c in checks if c["exposure"] and float(c["exposure"]) > 0}
    assert failing - ACCEPTED_EXPOSURES.keys() == set()
    passing = {c["name"] for c in checks if c["set"]}
    for must in (
        "User=/DynamicUser=",
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)",
        "SystemCallFilter=~@mount",
        "RestrictAddressFamilies=~AF_NETLINK",
        "MemoryDenyWriteExecute=",
    ):
        assert must in passing, f"{unit.name}: {must} is not satisfied"


# --- what the sandbox must allow, checked against the code and config -------


@pytest.mark.parametrize("unit", ACCOUNT_SERVICES, ids=_name)
def test_capabilities_are_the_three_needed(unit: Path) -> None:
    assert words(unit, "Service", "CapabilityBoundingSet") == CAPABILITIES.keys()
    assert words(unit, "Service", "AmbientCapabilities") == CAPABILITIES.keys()
    assert is_true(value(unit, "Service", "NoNewPrivileges"))
    user = value(unit, "Service", "User")
    assert user not in ("root", "0", "slurm")
    assert f"u {user} " in SYSUSERS.read_text()  # the account is created


def test_fchown_is_the_only_chown_the_code_makes() -> None:
    # The units allow fchown back after removing @privileged (which holds
    # @chown); chown/lchown/fchownat stay forbidden, so the code must not use
    # them.  (paramiko's sftp.chown is a request to the remote sshd, not a
    # system call here.)
    calls: list[str] = []
    for package in ("tokenlife", "producer", "repository", "transfer", "client_engine"):
        for source in (REPO / package).rglob("*.py"):
            text = source.read_text()
            found = re.findall(r"\b(?:os|shutil|posix)\.\w*chown\w*\(", text)
            calls += [f"{source.name}: {c}" for c in found]
    assert calls, "no chown call found: is the scan still looking at the code?"
    assert {c.split(": ")[1] for c in calls} == {"os.fchown("}, calls
    for unit in ACCOUNT_SERVICES:
        filters = values(unit, "Service", "SystemCallFilter")
        assert "~@privileged @resources" in filters and filters[-1] == "fchown", unit.name


def _under(path: Path, roots: set[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@pytest.mark.parametrize("unit", ACCOUNT_SERVICES, ids=_name)
def test_default_paths_are_writable(unit: Path) -> None:
    assert value(unit, "Service", "ProtectSystem") == "strict"
    writable = {Path(p) for p in words(unit, "Service", "ReadWritePaths")}
    writable |= {Path("/var/lib") / d for d in words(unit, "Service", "StateDirectory")}
    config = configmod.Config()
    store = Path(config.store.url.removeprefix("sqlite:///"))
    for path in (
        config.login.token_dir / "1000" / "slurm_jwt",
        config.producer.socket,
        store,
        config.store.spool_dir,
        config.key.cache_path,
    ):
        assert _under(path, writable), f"{unit.name}: {path} is read-only"
    # The store's spool must exist when the daemon starts (it only ingests a
    # spool directory that is there), so systemd creates it.
    assert config.store.spool_dir in writable


@pytest.mark.parametrize("unit", SERVICES, ids=_name)
def test_token_tree_is_not_a_runtime_directory(unit: Path) -> None:
    # RuntimeDirectory= would chown /run/tokenlife recursively to the service
    # user on start (every user's token with it) and delete it on stop.
    runtime = {Path("/run") / d for d in words(unit, "Service", "RuntimeDirectory")}
    assert not _under(configmod.Config().login.token_dir, runtime)
    assert not any(_under(r, {configmod.Config().login.token_dir}) for r in runtime)


@pytest.mark.parametrize("oneshot", ["tokenlife-renew.service", "tokenlife-push.service"])
def test_the_services_share_one_sandbox(oneshot: str) -> None:
    def sandbox(unit: Path) -> list[tuple[str, str]]:
        return [kv for kv in parse_unit(unit)["Service"] if kv[0] not in PER_SERVICE_KEYS]

    assert sandbox(SYSTEMD / "tokenlife.service") == sandbox(SYSTEMD / oneshot)
    assert len(sandbox(SYSTEMD / oneshot)) > 30


def test_daemon_notifications_match_the_code() -> None:
    unit = SYSTEMD / "tokenlife.service"
    source = (REPO / "tokenlife" / "app" / "daemon.py").read_text()
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert '"READY=1"' in source
    # A WatchdogSec= the daemon does not answer would kill it every period.
    has_watchdog = "WATCHDOG=1" in source
    assert bool(values(unit, "Service", "WatchdogSec")) == has_watchdog
    # ExecReload sends what the daemon treats as "reload the configuration".
    assert "SIGHUP" in source and "-HUP" in value(unit, "Service", "ExecReload")


def test_pam_lines_use_the_default_socket() -> None:
    default = str(configmod.Config().producer.socket)
    module, pam_exec = pam_lines()
    assert f"socket={default}" in module
    assert pam_exec[pam_exec.index("--socket") + 1] == default
    # The module's own defaults: the same socket, and the package's command.
    source = (REPO / "producer" / "pam" / "pam_tokenlife.c").read_text()
    assert f'#define DEFAULT_SOCKET "{default}"' in source
    assert '#define DEFAULT_FALLBACK "/usr/bin/tokenlife"' in source


# --- the change-hook template -----------------------------------------------


def test_watch_unit_runs_the_engine_as_the_instance_user() -> None:
    # ${TOKEN_FILE} stays one word; $HOOK alone is split into the hook's words.
    argv = value(WATCH_UNIT, "Service", "ExecStart").split(" ")
    assert argv == [SHIPPED_ENGINE, "watch", "--file", "${TOKEN_FILE}", "--", "$HOOK"]
    assert value(WATCH_UNIT, "Service", "EnvironmentFile") == "/etc/tokenlife/watch/%i.env"
    assert value(WATCH_UNIT, "Service", "User") == "%i"
    # No capabilities at all, and no way to gain any (sudo cannot work: documented).
    assert value(WATCH_UNIT, "Service", "CapabilityBoundingSet") == ""
    assert not values(WATCH_UNIT, "Service", "AmbientCapabilities")
    assert is_true(value(WATCH_UNIT, "Service", "NoNewPrivileges"))
    assert value(WATCH_UNIT, "Service", "ProtectSystem") == "strict"
    # A usage error (exit status 2: TOKEN_FILE or HOOK missing) is not retried.
    assert value(WATCH_UNIT, "Service", "Restart") == "on-failure"
    assert value(WATCH_UNIT, "Service", "RestartPreventExitStatus") == "2"


def test_watch_unit_options_are_the_engines() -> None:
    # The options ExecStart= passes are the ones `watch` takes.
    from client_engine.watcher import parse_args

    options = parse_args(["--file", "/run/tokenlife/1000/slurm_jwt", "--", "/bin/true", "x"])
    assert options.command == ["/bin/true", "x"]
    engine = Path(tokenlife_bin()).with_name("tokenlife-engine")
    result = run(str(engine), "--help")
    assert result.returncode == 0, result.stderr
    assert "tokenlife-engine watch --file PATH" in result.stdout


# --- the timer --------------------------------------------------------------


def seconds(span: str) -> float:
    require_tool("systemd-analyze")
    result = run("systemd-analyze", "timespan", span)
    assert result.returncode == 0, result.stderr
    found = re.search(r"μs: (\d+)", result.stdout)
    assert found, result.stdout
    return int(found[1]) / 1e6


def calendar_period(spec: str) -> float:
    require_tool("systemd-analyze")
    result = run("systemd-analyze", "calendar", "--iterations=2", spec, env={"TZ": "UTC"})
    assert result.returncode == 0, result.stderr
    stamps = re.findall(r"(?:Next elapse|Iter\. #2): \w+ (\S+ \S+) UTC", result.stdout)
    assert len(stamps) == 2, result.stdout
    first, second = (datetime.fromisoformat(s).replace(tzinfo=UTC) for s in stamps)
    return (second - first).total_seconds()


@pytest.mark.parametrize("name", ["tokenlife-renew", "tokenlife-push"])
def test_timer_is_persistent_and_randomized(name: str) -> None:
    timer = SYSTEMD / f"{name}.timer"
    assert is_true(value(timer, "Timer", "Persistent"))  # catches up after downtime
    delay = seconds(value(timer, "Timer", "RandomizedDelaySec"))
    period = calendar_period(value(timer, "Timer", "OnCalendar"))
    assert 0 < delay < period, (delay, period)
    # A tick every `period` leaves many tries inside the default renewal window.
    assert period * 4 <= configmod.Config().token.renew_before
    assert value(timer, "Install", "WantedBy") == "timers.target"


@pytest.mark.parametrize("command", ["renew", "push"])
def test_timer_runs_a_plain_cycle(command: str) -> None:
    service = SYSTEMD / f"tokenlife-{command}.service"
    assert not values(SYSTEMD / f"tokenlife-{command}.timer", "Timer", "Unit")  # same name
    assert value(service, "Service", "Type") == "oneshot"
    argv = shlex.split(value(service, "Service", "ExecStart"))
    # renew --now would re-mint every token on every tick; push --job is for the prolog.
    assert argv == [SHIPPED_BIN, command]
    assert "Install" not in parse_unit(service)  # started by the timer only
    assert seconds(value(service, "Service", "TimeoutStartSec")) > 0


# --- tmpfiles.d and sysusers.d ----------------------------------------------


def test_tmpfiles_creates_the_token_tree(tmp_path: Path) -> None:
    require_tool("systemd-tmpfiles")
    require_root()  # it chowns to root:root
    result = run("systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    token_dir = tmp_path / str(configmod.Config().login.token_dir).lstrip("/")
    st = token_dir.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    # No age: systemd-tmpfiles --clean must never expire a token file.
    lines = [ln.split() for ln in TMPFILES.read_text().splitlines() if ln and ln[0] != "#"]
    assert all(len(f) < 6 or f[5] == "-" for f in lines), lines


def test_sysusers_creates_a_system_account(tmp_path: Path) -> None:
    require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    assert "tokenlife" in result.stderr  # "Creating user 'tokenlife' ..."
    entries = [
        pwd.struct_passwd(line.split(":"))
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    ]
    (account,) = [e for e in entries if e.pw_name == "tokenlife"]
    assert int(account.pw_uid) < 1000  # a system account: no token at login
    assert account.pw_dir == "/var/lib/tokenlife"
    assert account.pw_shell.endswith("/nologin")

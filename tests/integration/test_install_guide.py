"""The install guide, run word for word on a fresh Debian 12 system.

docs/guide.md's "Install" section marks each shell block with an HTML comment
``<!-- install-test: TAG -->`` right above it (``none: reason`` for the few
that need real nodes; tests/unit/test_packaging.py checks that every block
carries one). Here the packages are built from this tree with
``packaging/build-deb.sh``, and then, in a throw-away overlay on a cached
debootstrap root (tests/integration/harness/sysroot.py: ``BOOKWORM``), the
marked blocks run in order as root, as an administrator would paste them:

* the package: ``deb`` then ``host`` blocks; checks; ``apt-get remove``
  (what it keeps); ``apt-get purge`` (only the administrator's own files are
  left); then the ``remove-deb`` block: nothing of tokenlife is left;
* the wheel: ``wheel`` then ``host`` blocks; the same checks; the
  ``remove-wheel`` block: nothing is left.

"Nothing left" compares the root's file list (path, type, mode, owner)
before the first block with the one after the last: the only differences
allowed are the package tools' own bookkeeping (``ALLOWED_CHANGES``), and no
path may name tokenlife. The account stays, as the guide says.

What the test provides, as a site would have it: Slurm's account and
``/etc/slurm`` (steps 1, 4 and 5 write there), an ordinary user, apt's
``Assume-Yes`` (an administrator answers apt's question by hand), and
``SYSTEMD_OFFLINE=1`` (no systemd runs in a chroot: systemd's own switch for
that makes ``systemctl start``/``stop``/``daemon-reload`` skip and
``enable``/``disable`` edit the links).

The last test checks the guide's known_hosts rules against a real sshd and
tokenlife's SSH code: an ``ssh_config`` alias is looked up under
``[HostName]:Port``, as ``ssh-keyscan -p PORT HOSTNAME`` prints it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require, require_root, require_tool
from tests.integration.conftest import ROOT_TOOLS
from tests.integration.harness.sysroot import (
    BOOKWORM,
    OverlaySession,
    RootBuildError,
    ensure_root,
)

GUIDE = REPO / "docs" / "guide.md"
# A marker, then the fenced block it belongs to, with nothing in between.
BLOCK = re.compile(
    r"^<!-- install-test: (?P<tag>[a-z-]+)(?P<why>: [^\n]*?)? -->\n```sh\n(?P<body>.*?)^```$",
    re.M | re.S,
)
TAGS = {"deb", "wheel", "host", "remove-deb", "remove-wheel", "none"}
USER = "alice"  # an ordinary account in the test system
WORK = "/root/install"  # where the administrator copied the packages
UNITS = (
    "tokenlife.service",
    "tokenlife-renew.service",
    "tokenlife-renew.timer",
    "tokenlife-push.service",
    "tokenlife-push.timer",
)
# What the package tools write for any package: apt's and dpkg's state, caches
# and logs, debconf's cache, the account tools' lock and backup files, pip's
# cache. The contents of /etc/passwd and the like are not compared: the
# account stays, on purpose.
ALLOWED_CHANGES = re.compile(
    r"^/(var/cache/(apt|debconf)|var/lib/(apt|dpkg)|var/log/apt|root/\.cache/pip)(/|$)"
    r"|^/var/log/(dpkg|alternatives)\.log$"
    r"|^/etc/(\.pwd\.lock|(passwd|group|shadow|gshadow)-)$"
)
# The administrator's own files, which purge keeps (and the guide then removes).
ADMIN_FILES = {
    "/etc/tokenlife",
    "/etc/tokenlife/id_ed25519",
    "/etc/tokenlife/id_ed25519.pub",
    "/etc/slurm/tokenlife-prolog-slurmctld.sh",
    "/etc/slurm/tokenlife-taskprolog.sh",
    "/etc/slurm/tokenlife-epilog.sh",
}
Listing = dict[str, tuple[str, int, int, int]]


def install_section(text: str) -> str:
    """The guide's "## Install" section, up to the next level-2 heading."""
    start = text.index("\n## Install\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def guide_blocks(text: str, *tags: str) -> list[str]:
    """The bodies of the install section's blocks marked with one of ``tags``, in order."""
    return [m["body"] for m in BLOCK.finditer(install_section(text)) if m["tag"] in tags]


@dataclass(frozen=True)
class Packages:
    wheel: Path
    wheels: Path
    deb: Path
    seconds: float


@pytest.fixture(scope="module")
def packages() -> Iterator[Packages]:
    """The wheel, its dependencies and the .deb, built from this tree as the guide says."""
    require_tool("dpkg-deb")
    require(Path("/usr/bin/python3").exists(), "needs Debian's /usr/bin/python3")
    out = Path(tempfile.mkdtemp(prefix="tl-dist-"))
    try:
        # The dependencies at the versions this test run uses: the package
        # ships what the suite tested. pip's cache makes a rebuild quick.
        freeze = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        constraints = out / "constraints.txt"
        constraints.write_text("".join(f"{line}\n" for line in freeze.splitlines() if "==" in line))
        env = {**os.environ, "PIP_CONSTRAINT": str(constraints)}
        began = time.monotonic()
        proc = subprocess.run(
            ["sh", str(REPO / "packaging" / "build-deb.sh"), str(out / "dist")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        seconds = time.monotonic() - began
        assert proc.returncode == 0, proc.stderr[-4000:]
        wheel, deb = (Path(line) for line in proc.stdout.split())
        yield Packages(wheel, out / "dist" / "wheels", deb, seconds)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def bookworm() -> Path:
    """A Debian 12 root: built on first use (~2 min), then cached."""
    require_root()
    require_tool(*ROOT_TOOLS)
    try:
        return ensure_root(BOOKWORM)
    except RootBuildError as err:  # e.g. no mirror reachable: a missing component
        require(False, f"cannot build the Debian 12 root: {err}")
        raise


@pytest.fixture
def box(bookworm: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OverlaySession]:
    """A fresh copy of the root, with what a site has before tokenlife comes."""
    # The overlay's upper directory gets the whole installed venv: removed
    # at the end rather than left to pytest's tmp_path retention.
    request.addfinalizer(lambda: shutil.rmtree(tmp_path / "overlay", ignore_errors=True))
    with OverlaySession(bookworm, tmp_path / "overlay") as session:
        site = (
            "useradd --system --user-group --no-create-home slurm\n"
            "install -d -m 0755 /etc/slurm\n"
            f"useradd --create-home --user-group {USER}\n"
            "echo 'APT::Get::Assume-Yes \"true\";' >/etc/apt/apt.conf.d/90assume-yes\n"
            f"install -d -m 0700 {WORK}\n"
        )
        run(session, site)
        yield session


def run(box: OverlaySession, script: str, user: str | None = None) -> str:
    """``script`` in the test system under ``set -ex``; its output, or a failed test."""
    env = {"SYSTEMD_OFFLINE": "1"}
    proc = box.run("set -ex\n" + script, user=user, env=env, cwd=WORK if user is None else "/")
    assert proc.returncode == 0, f"$ {script}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def listing(box: OverlaySession) -> Listing:
    """Every path of the test system but the kernel's, with type, mode and owner."""
    top = box.path("/")
    found: Listing = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == str(top):
            dirnames[:] = [d for d in dirnames if d not in ("proc", "sys", "dev", "tmp")]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            found["/" + os.path.relpath(full, top)] = (kind, st.st_mode, st.st_uid, st.st_gid)
    return found


def differences(before: Listing, after: Listing) -> set[str]:
    """Paths added, removed or changed, but for the tools' bookkeeping and
    the packages the administrator copied in (``WORK``)."""
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return {p for p in changed if not ALLOWED_CHANGES.search(p) and not p.startswith(WORK + "/")}


def check_installed(box: OverlaySession, tokenlife_bin: str, system: str) -> None:
    """What the guide promises once its blocks ran: the same for the package and the wheel."""
    # An ordinary user runs both commands, from the venv on Debian's interpreter.
    help_text = run(box, "tokenlife --help && tokenlife-engine --help", user=USER)
    assert "usage: tokenlife" in help_text and "usage: tokenlife-engine" in help_text
    assert run(box, "readlink -f /opt/tokenlife/bin/python").strip() == "/usr/bin/python3.11"
    assert run(box, f"readlink -f {tokenlife_bin}").strip() == "/opt/tokenlife/bin/tokenlife"
    # The installed TaskProlog, as slurmd runs it for a task of the user: the
    # engine runs (no "failed" line), the wrappers are used.
    env = "SLURM_JOB_ID=1 SLURM_STEP_ID=0 SLURM_JOB_UID=$(id -u) SLURM_JOB_USER=$(id -un)"
    prolog = run(box, f"env {env} /etc/slurm/tokenlife-taskprolog.sh", user=USER)
    lines = prolog.splitlines()
    assert lines and all(line.split()[0] in ("export", "unset", "print") for line in lines)
    assert "failed" not in prolog
    assert "export PATH=/usr/libexec/tokenlife/slurm:" in prolog
    # Units, account, directories, wrappers, snippets.
    for unit in UNITS:
        run(box, f"test -f {system}/systemd/system/{unit}")
    conf = "/usr/lib" if system == "/usr/lib" else "/etc"
    run(
        box, f"test -f {conf}/sysusers.d/tokenlife.conf && test -f {conf}/tmpfiles.d/tokenlife.conf"
    )
    run(box, "getent passwd tokenlife | grep -q ':/var/lib/tokenlife:/usr/sbin/nologin$'")
    assert run(box, "stat -c '%a %U %G' /run/tokenlife /var/log/tokenlife").split("\n")[:2] == [
        "755 root root",
        "755 root root",
    ]
    assert run(box, "stat -c '%U' /var/log/tokenlife/prolog.log").strip() == "slurm"
    wrappers = run(box, "stat -c '%a %U %n' /usr/libexec/tokenlife/slurm/*").splitlines()
    assert "755 root /usr/libexec/tokenlife/slurm/srun" in wrappers, wrappers
    run(box, "test -f /usr/libexec/tokenlife/slurm/.tokenlife-wrappers")
    for script in ("taskprolog.sh", "epilog.sh", "prolog_slurmctld.sh"):
        run(box, f"test -x /usr/share/tokenlife/slurm/{script}")
    # The PAM module the shipped line names, where PAM finds it, loadable.
    line = run(box, "grep -v '^#' /usr/share/tokenlife/pam.d/tokenlife").split()
    assert line[:3] == ["session", "optional", "pam_tokenlife.so"], line
    module = "/usr/lib/x86_64-linux-gnu/security/pam_tokenlife.so"
    assert run(box, f"stat -c '%a %U' {module}").strip() == "644 root"
    run(box, f"/usr/bin/python3 -c 'import ctypes; ctypes.CDLL(\"{module}\").pam_sm_open_session'")
    # Every path the snippets and units name is the installed command.
    named = run(
        box,
        "grep -rhoE '/usr(/local)?/bin/tokenlife[a-z-]*' /usr/share/tokenlife "
        f"{system}/systemd/system | sort -u",
    ).split()
    assert named and all(p.startswith(tokenlife_bin) for p in named), named
    # The SSH key as step 3 leaves it serves root and the services' account
    # (through the units' CAP_DAC_OVERRIDE), and that account without it not.
    load = (
        "/opt/tokenlife/bin/python -c 'from tokenlife.config import load; "
        "from transfer.ssh import SshPool; SshPool(load().delivery.ssh)._identity()'"
    )
    run(box, load)
    as_service = "setpriv --reuid=tokenlife --regid=tokenlife --clear-groups"
    caps = "--inh-caps=+dac_override --ambient-caps=+dac_override"
    run(box, f"{as_service} {caps} {load}")
    refused = box.run(f"{as_service} {load}")
    assert refused.returncode != 0 and "is not readable by uid" in refused.stderr
    # The PrologSlurmctld script, as slurmctld runs it: tokenlife runs (and
    # fails here: no store for slurm, no nodes) into its log; exit 0.
    env = "SLURM_JOB_ID=1 SLURM_JOB_USER=alice SLURM_JOB_NODELIST=node01"
    run(box, f"env {env} /etc/slurm/tokenlife-prolog-slurmctld.sh", user="slurm")
    assert run(box, "cat /var/log/tokenlife/prolog.log").strip()


def test_the_guide_installs_and_removes_the_debian_package(
    box: OverlaySession, packages: Packages
) -> None:
    text = GUIDE.read_text()
    began = time.monotonic()
    before = listing(box)
    shutil.copy(packages.deb, box.path(WORK))
    for block in guide_blocks(text, "deb", "host"):
        run(box, block)
    check_installed(box, "/usr/bin/tokenlife", "/usr/lib")
    # Byte-code made by postinst, at the installed paths.
    pyc = (
        "/opt/tokenlife/lib/python3.11/site-packages/tokenlife/__pycache__/__init__.cpython-311.pyc"
    )
    run(box, f"test -f {pyc}")
    run(box, "test -L /etc/systemd/system/multi-user.target.wants/tokenlife.service")
    # An upgrade (the same version again): prerm drops the byte-code, postinst
    # makes it and the wrappers again; the administrator's choices stay.
    run(box, "rm /usr/libexec/tokenlife/slurm/srun && dpkg -i tokenlife_*.deb")
    run(box, "test -x /usr/libexec/tokenlife/slurm/srun")
    run(box, "test -L /etc/systemd/system/multi-user.target.wants/tokenlife.service")
    run(box, f"test -f {pyc}")

    # remove: the program, its wrappers and byte-code go; the configuration,
    # the logs, the runtime directory and the enabled units' links (with
    # deb-systemd-helper's record of them) stay until purge.
    run(box, "apt-get remove tokenlife")
    kept = {p for p in differences(before, listing(box)) if "tokenlife" in p}
    dsh = "/var/lib/systemd/deb-systemd-helper-enabled"
    assert kept == ADMIN_FILES | {f"{dsh}/{unit}.dsh-also" for unit in UNITS} | {
        "/etc/tokenlife/tokenlife.toml",
        "/etc/systemd/system/multi-user.target.wants/tokenlife.service",
        "/var/log/tokenlife",
        "/var/log/tokenlife/prolog.log",
        "/run/tokenlife",
    }, kept
    # The guide's removal, one command at a time: purge leaves only the
    # administrator's own files, and after the last command nothing is left.
    (removal,) = guide_blocks(text, "remove-deb")
    assert "apt-get purge tokenlife\n" in removal
    for command in removal.splitlines():
        run(box, command)
        if command == "apt-get purge tokenlife":
            left = {p for p in differences(before, listing(box)) if "tokenlife" in p}
            assert left == ADMIN_FILES - {p for p in ADMIN_FILES if p.startswith("/etc/slurm")}
    assert differences(before, listing(box)) == {"/etc/slurm/jwt_hs256.key"}
    run(box, "getent passwd tokenlife >/dev/null")  # kept, as Debian keeps system accounts
    print(
        f"package: built in {packages.seconds:.0f} s, guide run in {time.monotonic() - began:.0f} s"
    )


def test_the_guide_installs_and_removes_the_wheel(box: OverlaySession, packages: Packages) -> None:
    text = GUIDE.read_text()
    began = time.monotonic()
    work = box.path(WORK)
    before = listing(box)
    shutil.copy(packages.wheel, work)
    shutil.copytree(packages.wheels, work / "wheels")
    shutil.copytree(REPO / "systemd", work / "systemd")
    pam_source = REPO / "producer" / "pam"
    shutil.copytree(pam_source, work / "producer" / "pam", ignore=shutil.ignore_patterns("*.so"))
    for block in guide_blocks(text, "wheel", "host"):
        run(box, block)
    check_installed(box, "/usr/local/bin/tokenlife", "/etc")
    for block in guide_blocks(text, "remove-wheel"):
        run(box, block)
    # Slurm's key stays; so does /etc/sysusers.d, which `install -D` made
    # (systemd reads it; Debian ships none), as for any administrator's file.
    assert differences(before, listing(box)) == {"/etc/slurm/jwt_hs256.key", "/etc/sysusers.d"}
    print(f"wheel: guide run in {time.monotonic() - began:.0f} s")


def test_known_hosts_rules_of_the_guide_hold_on_a_real_sshd(tmp_path: Path) -> None:
    """Step 3: an ssh_config alias is looked up under ``[HostName]:Port``.

    known_hosts made with ``ssh-keyscan -p PORT HOSTNAME`` (plain or hashed)
    lets tokenlife reach the alias; an entry under the alias is not used, and
    the refusal names what was looked up.
    """
    require_root()
    require_tool("sshd", "ssh-keygen", "ssh-keyscan", "unshare", "nsenter")
    from tests.integration.harness.sshnodes import SshNodes
    from tokenlife.config import SshConfig
    from tokenlife.errors import TransportError
    from transfer.ssh import SshPool

    with SshNodes(tmp_path / "nodes", 1) as nodes:
        node = nodes["node01"]
        assert node.port != 22  # the case where the [HostName]:Port form matters
        scan = ["ssh-keyscan", "-t", "ed25519", "-p", str(node.port), node.address]
        plain = subprocess.run(scan, capture_output=True, text=True, check=True).stdout
        hashed = subprocess.run(
            [*scan[:1], "-H", *scan[1:]], capture_output=True, text=True, check=True
        ).stdout
        assert plain.startswith(f"[{node.address}]:{node.port} ssh-ed25519 ")
        alias = plain.replace(f"[{node.address}]", "[node01]", 1)
        known = tmp_path / "known_hosts"

        def reach() -> None:
            config = SshConfig(
                identity_file=nodes.client_key, known_hosts=known, ssh_config=nodes.ssh_config
            )
            pool = SshPool(config)
            try:
                with pool.fs("node01"):
                    pass
            finally:
                pool.close()

        for good in (plain, hashed):
            known.write_text(good)
            reach()
        known.write_text(alias)
        with pytest.raises(TransportError) as refused:
            reach()
        assert f"(looked up as [{node.address}]:{node.port})" in str(refused.value)

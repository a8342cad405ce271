"""Debian system roots that carry another Slurm release, built once and cached.

The test machine runs Debian 12 (Slurm 22.05). To test against a newer Slurm
without a second machine, ``debootstrap`` builds a minimal Debian root with
that release's packages; :class:`tests.integration.harness.slurm.SlurmCluster`
then runs every daemon and client of that cluster inside it (``system_root=``).
A plain Debian 12 root (``BOOKWORM``) is where the install guide's commands
run (tests/integration/test_install_guide.py), each test in an
:class:`OverlaySession`: a throw-away overlay on the cached root, so the
cache stays pristine and what a test changed is a directory walk away.

A build takes about a minute and a few hundred MB, so a root is kept in a
cache directory and reused by later runs. :func:`ensure_root` makes that safe:

* an exclusive ``flock`` on ``<cache>/<name>.lock``: two pytest processes
  never build the same root twice, the second waits and reuses the first's;
  debootstrap inherits the lock, so even a builder killed with SIGKILL keeps
  others out until its debootstrap is gone (its half-built root is then
  removed and built again);
* the build happens in a temporary directory beside the root and is renamed
  into place only when complete, with a stamp file (``STAMP``) naming the
  suite, the packages asked for and the versions installed: a root without a
  stamp, or whose stamp asks for other packages, is rebuilt;
* ``debootstrap`` runs in a private mount namespace, so the ``/proc`` and
  ``/sys`` it mounts inside the root never show up on the host, even when it
  dies half way.

The cache is ``/var/cache/tokenlife-tests`` (``$TOKENLIFE_TEST_CACHE``), the
mirror ``deb.debian.org`` (``$TOKENLIFE_DEBIAN_MIRROR``); the suite's Release
file is checked against Debian's archive keyring. No pytest here; needs root,
``debootstrap`` and a reachable Debian mirror.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness.procfs import exe, kill_namespaces, mnt_ns

CACHE = Path(os.environ.get("TOKENLIFE_TEST_CACHE", "/var/cache/tokenlife-tests"))
MIRROR = os.environ.get("TOKENLIFE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
STAMP = ".tokenlife-root.json"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


class RootBuildError(RuntimeError):
    """debootstrap failed, or the root it built is not what was asked for."""


@dataclass(frozen=True)
class RootSpec:
    """What a cached root holds: a Debian suite with some packages."""

    name: str  # directory name under the cache
    suite: str  # Debian suite for debootstrap
    packages: tuple[str, ...]
    slurm_series: str | None = None  # what ``slurmctld -V`` must report, e.g. "24.11"


SLURM_PACKAGES = (
    "slurmctld",
    "slurmd",
    "slurmrestd",
    "slurm-client",
    "slurm-wlm-jwt-plugin",
    "munge",
    "python3",  # the tokenlife-engine launcher of jobs runs on it
)
SLURM_24_11 = RootSpec("slurm-24.11-root", "trixie", SLURM_PACKAGES, "24.11")
# A plain Debian 12 host, for tests/integration/test_install_guide.py: what the
# install guide's commands and the .deb's maintainer scripts need beyond
# minbase (the package's dependencies, the wheel's venv, ssh-keygen).
BOOKWORM_PACKAGES = (
    "python3",
    "python3-venv",
    "systemd",
    "init-system-helpers",  # deb-systemd-helper, used by the package's scripts
    "openssh-client",
    # The wheel's path builds the PAM module as the guide says.
    "make",
    "gcc",
    "libc6-dev",
    "libpam0g-dev",
)
BOOKWORM = RootSpec("debian-12-root", "bookworm", BOOKWORM_PACKAGES)


def stamp(root: Path) -> dict[str, object] | None:
    """The stamp of a complete root, None if there is none (or it is unreadable)."""
    try:
        data = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _matches(root: Path, spec: RootSpec) -> bool:
    found = stamp(root)
    return (
        found is not None
        and found.get("suite") == spec.suite
        and found.get("packages") == list(spec.packages)
        and found.get("slurm_series") == spec.slurm_series
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """Hold an exclusive flock on ``path``; yields the descriptor that holds it."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield fh.fileno()  # closing the file (and every inherited copy) unlocks


def ensure_root(spec: RootSpec = SLURM_24_11, cache: Path = CACHE, mirror: str = MIRROR) -> Path:
    """The root for ``spec`` under ``cache``: reused when its stamp matches, else built."""
    root = cache / spec.name
    if _matches(root, spec):  # the common case: no lock needed to read a finished root
        return root
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    with _locked(cache / f"{spec.name}.lock") as lock_fd:
        if _matches(root, spec):  # built by another process while we waited
            return root
        if shutil.which("debootstrap", path=PATH) is None:
            raise RootBuildError(f"{root} needs building, and debootstrap is not installed")
        _remove_leftovers(cache, spec)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=cache))
        try:
            _build(tmp, spec, mirror, lock_fd)
            old: Path | None = None
            if root.exists() or root.is_symlink():
                # A stale or different root (its spec changed): moved aside,
                # the new one renamed in, the old one removed after.
                old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=cache))
                os.rename(root, old / "root")
            os.rename(tmp, root)
        except BaseException:
            _rmtree(tmp)
            raise
        if old is not None:
            _rmtree(old)
    return root


def _remove_leftovers(cache: Path, spec: RootSpec) -> None:
    """Builds killed half way leave their temporary directories: remove them (under the lock)."""
    for path in cache.glob(f".{spec.name}.*-*"):
        _rmtree(path)


def _rmtree(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():  # a build's log
        path.unlink(missing_ok=True)
        return
    # Never follow a mount: debootstrap ran in its own namespace, so there
    # should be none on the host; refuse rather than delete through one.
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            if os.path.ismount(os.path.join(dirpath, name)):
                raise RootBuildError(f"{dirpath}/{name} is a mount point: not removing {path}")
    shutil.rmtree(path, ignore_errors=True)


def _build(tmp: Path, spec: RootSpec, mirror: str, lock_fd: int) -> None:
    began = time.monotonic()
    tmp.chmod(0o755)
    log = tmp.with_name(tmp.name + ".log")
    argv = ["unshare", "--mount", "--propagation", "private", "--", "debootstrap"]
    argv += ["--variant=minbase", f"--include={','.join(spec.packages)}"]
    if KEYRING.exists():  # verify the suite's Release file, not just warn
        argv.append(f"--keyring={KEYRING}")
    argv += [spec.suite, str(tmp), mirror]
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(
                argv,
                env={"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # debootstrap and its children hold the lock too: should this
                # process be killed, no other build starts while they still write.
                pass_fds=(lock_fd,),
                timeout=1800,
                check=False,
            )
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RootBuildError(
                f"debootstrap {spec.suite} failed ({proc.returncode}):\n" + "\n".join(tail)
            )
    finally:
        log.unlink(missing_ok=True)
    versions = _installed(tmp, spec.packages)
    if spec.slurm_series is not None:
        series = _slurm_series(tmp)
        if series != spec.slurm_series:
            raise RootBuildError(f"{spec.suite} has Slurm {series}, expected {spec.slurm_series}")
    data = {
        "suite": spec.suite,
        "mirror": mirror,
        "packages": list(spec.packages),
        "slurm_series": spec.slurm_series,
        "versions": versions,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - began, 1),
    }
    (tmp / STAMP).write_text(json.dumps(data, indent=2) + "\n")


def _installed(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    fmt = "${Package}\t${Version}\t${db:Status-Abbrev}\n"
    proc = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", f"-f={fmt}", *packages],
        env={"PATH": PATH, "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=False,
    )
    versions = {}
    for line in proc.stdout.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status.startswith("ii"):
            versions[name] = version
    missing = [p for p in packages if p not in versions]
    if missing:
        raise RootBuildError(f"not installed in the new root: {missing} {proc.stderr.strip()}")
    return versions


def slurm_version(root: Path | None = None) -> str:
    """``slurmctld -V`` of the host (None) or of a root, e.g. "24.11.5"."""
    argv = ["/usr/sbin/slurmctld", "-V"]
    if root is not None:
        argv = ["chroot", str(root), *argv]
    proc = subprocess.run(
        argv, env={"PATH": PATH, "LANG": "C.UTF-8"}, capture_output=True, text=True, check=False
    )
    words = proc.stdout.split()
    if proc.returncode != 0 or len(words) < 2:
        where = f"in {root}" if root else "on this host"
        raise RuntimeError(f"slurmctld -V failed {where}: {proc.stderr.strip()}")
    return words[-1]


def _slurm_series(root: Path) -> str:
    return ".".join(slurm_version(root).split(".")[:2])


# The holder of an overlay session: the cached root as the read-only lower
# layer, the session's changes in its own upper directory; then the kernel
# file systems a package's scripts expect, and keep the namespace.
_OVERLAY_HOLDER = """\
set -e
lower=$1; upper=$2; work=$3; merged=$4
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged"
mount -t proc proc "$merged/proc"
mount --rbind /dev "$merged/dev"
mount --rbind /sys "$merged/sys"
mount -o remount,bind,ro "$merged/sys"
exec sleep infinity
"""


class OverlaySession:
    """A throw-away copy of a cached root: an overlay in a private mount namespace.

    ``with OverlaySession(root, workdir) as box: box.run("apt-get install ...")``.
    Everything written lands in ``box.upper`` (the overlay's upper directory),
    so the cached root stays pristine for the next session, and what changed
    is a plain directory walk away (:meth:`changes`). A *holder* process
    (``unshare --mount --propagation private``) owns the namespace and its
    mounts: the overlay, ``/proc``, ``/dev`` and a read-only ``/sys``; commands
    enter it with ``nsenter`` and ``chroot``. No systemd runs there (no
    ``/run/systemd/system``), as in any chroot. The network is the host's. Stopping
    kills every process left in the namespace, and the mounts go with it.
    """

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.upper = workdir / "upper"
        self.merged = workdir / "merged"
        self._holder: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None

    def __enter__(self) -> OverlaySession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for d in (self.upper, self.workdir / "work", self.merged):
            d.mkdir(mode=0o755, parents=True)
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        argv += ["/bin/sh", "-c", _OVERLAY_HOLDER, "holder", str(self.root), str(self.upper)]
        argv += [str(self.workdir / "work"), str(self.merged)]
        self._holder = subprocess.Popen(
            argv,
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            start_new_session=True,
        )
        sleep = os.path.realpath(shutil.which("sleep", path=PATH) or "/bin/sleep")
        host_ns = mnt_ns("self")
        deadline = time.monotonic() + 15
        while True:  # it execs sleep once every mount is made
            if self._holder.poll() is not None:
                err = self._holder.stderr.read().decode() if self._holder.stderr else ""
                raise RootBuildError(
                    f"the overlay holder exited ({self._holder.returncode}): {err}"
                )
            if exe(self._holder.pid) == sleep:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RootBuildError("timed out waiting for the overlay holder")
            time.sleep(0.01)
        ns = mnt_ns(self._holder.pid)
        if ns is None or ns == host_ns:
            self.stop()
            raise RootBuildError("the overlay holder has no private mount namespace")
        self._ns = ns

    def run(
        self,
        script: str,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "/",
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """``sh -c script`` in the root (as ``user``, with that user's groups, if given)."""
        if self._holder is None or self._ns is None:
            raise RootBuildError("the overlay session is not started")
        inner = ["/bin/sh", "-c", f'cd "$1" && shift && {script}', "sh", cwd]
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *inner]
        argv = ["nsenter", f"--target={self._holder.pid}", "--mount", "--"]
        argv += ["chroot", str(self.merged), *inner]
        home = "/root" if user in (None, "root") else f"/home/{user}"
        base = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": home, "DEBIAN_FRONTEND": "noninteractive"}
        return subprocess.run(
            argv,
            env={**base, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def path(self, inside: str) -> Path:
        """A path in the root, as this process sees it (through the holder's /proc root)."""
        if self._holder is None:
            raise RootBuildError("the overlay session is not started")
        return Path(f"/proc/{self._holder.pid}/root{self.merged}") / inside.lstrip("/")

    def changes(self) -> dict[str, str]:
        """What the session changed in the root so far: ``{"/etc/x": kind}``.

        The kinds are "dir", "file", "link", and "deleted" (an overlay
        whiteout); a file that was changed in place shows as "file".
        """
        found: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.upper):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                kind = (
                    "deleted"
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                    else "dir"
                    if stat.S_ISDIR(st.st_mode)
                    else "link"
                    if stat.S_ISLNK(st.st_mode)
                    else "file"
                )
                found["/" + os.path.relpath(full, self.upper)] = kind
        return found

    def stop(self) -> None:
        holder, ns = self._holder, self._ns
        if holder is None:
            return
        try:
            if ns is not None:
                left = kill_namespaces({ns}, {holder.pid, os.getpid()})
                if left:
                    raise RootBuildError(f"processes {left} in the overlay do not die")
        finally:
            if holder.poll() is None:
                holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(10)
            if holder.stderr is not None:
                holder.stderr.close()
            self._holder, self._ns = None, None

"""Debian system roots that carry another Slurm release, built once and cached.

The test machine runs Debian 12 (Slurm 22.05). To test against a newer Slurm
without a second machine, ``debootstrap`` builds a minimal Debian root with
that release's packages; :class:`tests.integration.harness.slurm.SlurmCluster`
then runs every daemon and client of that cluster inside it (``system_root=``).

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
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    slurm_series: str  # what ``slurmctld -V`` must report, e.g. "24.11"


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

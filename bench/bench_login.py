"""Login cost as the user sees it: real ``ssh`` logins, with and without the PAM line.

One real OpenSSH server per case listens on 127.0.0.1 (its own port, host key
and sshd_config: ``UsePAM yes`` and Debian's other defaults), and the test
user tlalice (created if missing) logs in with ``ssh -i KEY -p PORT
tlalice@127.0.0.1 true``, pubkey only.  The cases differ only in the PAM
service file sshd reads:

  no PAM line     Debian's /etc/pam.d/sshd as this host has it (the baseline)
  service up      the same plus the shipped line of systemd/pam.d/tokenlife
                  (pam_tokenlife.so, built from producer/pam for the run), its
                  socket= pointing at a running ``tokenlife serve``
  service down    the same line, its socket= pointing where nothing listens:
                  the module runs ``tokenlife pam --no-service`` (spool record)
  pam_exec, ...   the shipped file's other line (commented out there): pam_exec
                  running ``tokenlife pam``, service up and down

``--calibrate`` adds the same pam_exec line running ``/bin/true`` and the
install's ``python -c pass``: what pam_exec itself costs, and what starting
an interpreter costs, before tokenlife does anything.  ``--compare BINDIR``
adds both PAM cases running another install's ``tokenlife`` (an older
release, say) in the same rounds.

How each sshd gets its own PAM file: portable OpenSSH passes its program
name to ``pam_start()`` (SSHD_PAM_SERVICE defaults to ``__progname``), so an
sshd started through a symlink named ``sshd-x`` reads /etc/pam.d/sshd-x; that
would need a file in the host's /etc/pam.d.  Instead each sshd runs in a
private mount namespace (``unshare --mount --propagation private``) in which
a bind mount puts the case's file over /etc/pam.d/sshd: the service name is
``sshd`` as in production, sshd and every login process it starts (pam_exec,
``tokenlife pam``) see the case's file, and the host's is never touched
(checked before and after).  The ``@include``d files are the host's.

The PAM line runs a production-style install of this tree (a fresh venv of
Debian's python, not editable, no dependencies: the login path needs none),
as bench/bench_pam.py does: the editable test venv adds ~10 ms of import
machinery to every interpreter start that production does not pay.  The
line gets ``-c CONFIG`` so that both cases find their configuration; the
service (``tokenlife serve`` of the test venv, with its dependencies) has a
SQLite store and an HS256 key file, and writes login token files to a tmpfs
(/dev/shm), as /run is in production.  The two cases have separate token
directories and stores, so each login is the steady state of its case: the
user's token is still good and is reused (``--fresh``: every login mints).

pam_exec close()s every descriptor number below the hard RLIMIT_NOFILE (at
most 65535 of them) before it runs its program, so the sshds' limit sets
pam_exec's own cost: they inherit this process's unless ``--sshd-nofile N``.

The cases alternate, in a new random order every round, so drift in the
machine's load hits them alike and no case always follows the same one.  A
login is timed until the client has the command's status; the session's end
(pam_exec runs the line again for close_session) is waited for untimed before
the next login, which must not pay for it.  The table shows the median and p90 of
each case, the overhead of a case as a percentage of the no-PAM median with
a 90 % bootstrap interval, and the median of the per-round differences (the
paired estimate, less sensitive to drift).  A login varies by tens of
milliseconds on a busy machine: telling a few milliseconds apart takes a few
hundred runs (``-n 300``) and a quiet machine.  A second table times the PAM command alone, run
directly with PAM_TYPE/PAM_USER set, next to the interpreter's own start.
Targets (reported, never asserted): service up <= 3 %, service down <= 10 %,
for the shipped (first) line.

Run as root (sshd, namespaces, the test user):  .venv/bin/python bench/bench_login.py
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.harness import pam_module  # noqa: E402
from tests.integration.harness.users import ALICE, ensure_user  # noqa: E402

PACKAGES = ("tokenlife", "producer", "repository", "transfer", "client_engine")
SSHD = "/usr/sbin/sshd"  # absolute: sshd re-executes itself for every connection
HOST_PAM = Path("/etc/pam.d/sshd")
SHIPPED_LINE = REPO / "systemd" / "pam.d" / "tokenlife"
CASES = (
    "no PAM line",
    "service up",
    "service down",
    "pam_exec, service up",
    "pam_exec, service down",
)
#: --calibrate: the PAM line with another program (PYTHON: the install's interpreter)
CALIBRATION = {
    "pam_exec /bin/true": ["/bin/true"],
    "pam_exec python -c pass": ["PYTHON", "-c", "pass"],
}
TARGETS = {"service up": 3.0, "service down": 10.0}  # overhead, % of the no-PAM login
# The namespace's one job: put the case's PAM file where sshd looks, then be sshd.
NAMESPACE_SCRIPT = 'mount --bind "$1" /etc/pam.d/sshd || exit 1; exec "$2" -D -e -f "$3"'


# -- the pieces -------------------------------------------------------------------------------


def install_like_production(work: Path) -> Path:
    """This tree, installed as in production (regular, not editable) in a fresh venv.

    Built from a copy: pip builds a local project in place, and a build/
    left in the tree could carry stale modules into the next install.
    """
    src = work / "src"
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = Path(sys.executable).parent / "pip"
    subprocess.run(
        [str(pip), "--python", str(venv / "bin/python"), "install", "-q", "--no-deps", str(src)],
        check=True,
        capture_output=True,
    )
    return venv / "bin"


def shipped_lines() -> tuple[list[str], list[str]]:
    """The shipped file's PAM line (the module) and its pam_exec alternative, as words."""
    text = SHIPPED_LINE.read_text().splitlines()
    (active,) = [raw for raw in text if raw.strip() and raw[0] != "#"]
    (other,) = [raw[1:] for raw in text if raw.startswith("#session")]
    return shlex.split(active), shlex.split(other)


def module_command(module: Path, bindir: Path, config: Path, sock: Path) -> list[str]:
    """The shipped module line, adapted to this run: the module built here, its
    socket= ``sock``, its fallback= in ``bindir``, and config= ``config``."""
    words, _ = shipped_lines()
    out = []
    for word in words:
        if word == "pam_tokenlife.so":
            word = str(module)
        elif word.startswith("socket="):
            word = f"socket={sock}"
        elif word.startswith("fallback="):
            word = f"fallback={bindir / Path(word.partition('=')[2]).name}"
        out.append(word)
    return [*out, f"config={config}"]


def pam_command(bindir: Path, config: Path, sock: Path) -> list[str]:
    """The shipped pam_exec line's module and arguments, adapted to this install.

    The program keeps its name (a changed line is measured as shipped) but
    lives in ``bindir``; ``-c CONFIG`` follows it; ``--socket`` is ``sock``.
    """
    _, words = shipped_lines()
    at = next(i for i, w in enumerate(words) if w.startswith("/") and "tokenlife" in w)
    words[at] = str(bindir / Path(words[at]).name)
    words.insert(at + 1, "-c")
    words.insert(at + 2, str(config))
    words[words.index("--socket") + 1] = str(sock)
    return words


def program(line: list[str], bindir: Path) -> list[str]:
    """The command pam_exec runs: the PAM line from its program on."""
    return line[next(i for i, w in enumerate(line) if w.startswith(f"{bindir}/")) :]


def write_config(work: Path, run: Path, name: str, key: Path, fresh: bool) -> Path:
    cfg = work / f"{name}.toml"
    # renew_before longer than the lifetime: every token is due, so every login mints.
    token = '[token]\nlifetime = "1h"\nrenew_until = "2h"\nrenew_before = "90m"\n' if fresh else ""
    cfg.write_text(
        f'[key]\npath = "{key}"\n{token}'
        f'[store]\nurl = "sqlite:///{work}/{name}.db"\nspool_dir = "{work}/{name}-spool"\n'
        f'[login]\ntoken_dir = "{run}/{name}"\n'
        f'[producer]\nsocket = "{work}/{name}.sock"\n'
        # The daemon here only mints: no delivery, no metrics port to clash.
        '[serve]\ndeliver = false\nmetrics = ""\n'
    )
    return cfg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start within 30 s")
        time.sleep(0.02)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Sshd:
    """One sshd on 127.0.0.1:port whose PAM service file is ``pam_text``."""

    def __init__(
        self, work: Path, name: str, pam_text: str, host_key: Path, keys: Path, nofile: int
    ) -> None:
        self.name, self.port = name, free_port()
        slug = "".join(c if c.isalnum() else "-" for c in name)
        self.pam_file = work / f"pam-{slug}"
        self.pam_file.write_text(pam_text)
        self.config = work / f"sshd-{slug}.conf"
        self.config.write_text(
            # Debian's sshd_config defaults (KbdInteractive off, UsePAM, PrintMotd
            # off: pam_motd prints it), plus what a private test server needs.
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {host_key}\n"
            "PidFile none\n"
            "LogLevel ERROR\n"
            "UsePAM yes\n"
            "KbdInteractiveAuthentication no\n"
            "PasswordAuthentication no\n"
            "PubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {keys}\n"
            # StrictModes checks every directory above the key file up to "/":
            # /tmp (1777) always fails it.  The file itself is root's, 0644.
            "StrictModes no\n"
            "PermitRootLogin no\n"
            "X11Forwarding yes\n"
            "PrintMotd no\n"
            "AcceptEnv LANG LC_*\n"
            "UseDNS no\n"
            "MaxStartups 100\n"
        )
        self.log = work / f"sshd-{slug}.log"
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        argv += [
            "/bin/sh",
            "-c",
            NAMESPACE_SCRIPT,
            "sh",
            str(self.pam_file),
            SSHD,
            str(self.config),
        ]
        # pam_exec close()s every descriptor number below the hard RLIMIT_NOFILE
        # (up to 65535) before it runs its program: that limit sets its cost.
        limit = (nofile, nofile) if nofile else None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit))
                if limit
                else None,
            )
        wait_for(f"sshd ({name})", lambda: listening(self.port), self.proc)
        # The bind mount is in sshd's namespace only.
        ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        if ns == os.readlink("/proc/self/ns/mnt"):
            raise SystemExit(f"sshd ({name}) is not in a private mount namespace")
        seen = Path(f"/proc/{self.proc.pid}/root/etc/pam.d/sshd").read_text()
        if seen != pam_text:
            raise SystemExit(f"sshd ({name}) does not see its PAM file")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no session process of this sshd is left."""
        deadline = time.monotonic() + timeout
        while children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.002)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    # The fields after the command's closing parenthesis: state, ppid, ...
                    if int(fh.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    return found


def keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-login", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


# -- measuring --------------------------------------------------------------------------------


def timed_run(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, check=False, stdin=subprocess.DEVNULL)
    took = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return took


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def interval(samples: list[float], base: list[float], rounds: int = 2000) -> tuple[float, float]:
    """A 90 % bootstrap interval of the overhead (% of the baseline's median)."""
    rng = random.Random(13)  # the same interval for the same samples
    found = []
    for _ in range(rounds):
        a = statistics.median(rng.choices(samples, k=len(samples)))
        b = statistics.median(rng.choices(base, k=len(base)))
        found.append((a - b) / b * 100)
    found.sort()
    return found[int(0.05 * rounds)], found[int(0.95 * rounds)]


def verdict(overhead: float, limit: float) -> str:
    if overhead <= limit:
        return f"ok ({overhead:.1f} % <= {limit:g} %)"
    return f"MISSED ({overhead:.1f} % > {limit:g} %)"


def check_token_file(path: Path, uid: int) -> None:
    st = path.stat()
    if st.st_uid != uid or st.st_mode & 0o777 != 0o600 or st.st_size < 100:
        raise SystemExit(f"{path}: not the user's 0600 token file")


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=50, help="logins per case (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed logins per case first")
    parser.add_argument(
        "--fresh", action="store_true", help="every login mints a new token (default: reuse)"
    )
    parser.add_argument(
        "--bindir",
        type=Path,
        help="where the PAM line's program is (default: a fresh production-style install)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="also time the PAM line running the tokenlife in this bin directory (e.g. an "
        "older release's), in the same rounds",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also time the PAM line running /bin/true and `python -c pass`",
    )
    parser.add_argument(
        "--sshd-nofile",
        type=int,
        default=0,
        help="RLIMIT_NOFILE (soft and hard) of the sshds (default: this process's)",
    )
    parser.add_argument(
        "--no-direct", dest="direct", action="store_false", help="skip the PAM-command table"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (sshd, mount namespaces, the test user)")
    for tool in ("ssh", "ssh-keygen", "unshare", SSHD):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still cleans up
    host_pam = HOST_PAM.read_bytes()
    user = ensure_user(ALICE)

    work = Path(tempfile.mkdtemp(prefix="tl-bench-login-"))
    work.chmod(0o755)
    run = Path(tempfile.mkdtemp(prefix="tl-bench-login-run-", dir="/dev/shm"))
    sshds: list[Sshd] = []
    service: subprocess.Popen[bytes] | None = None
    try:
        key = work / "jwt_hs256.key"
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(0o600)
        bindir = args.bindir or install_like_production(work)
        up_cfg = write_config(work, run, "up", key, args.fresh)
        down_cfg = write_config(work, run, "down", key, args.fresh)
        sock = work / "up.sock"
        full = Path(sys.executable).parent / "tokenlife"
        with open(work / "serve.log", "wb") as log:
            service = subprocess.Popen(
                [str(full), "-c", str(up_cfg), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("tokenlife serve", sock.is_socket, service)

        host_key, client_key = work / "host_key", work / "client_key"
        keygen(host_key)
        keygen(client_key)
        keys = work / "authorized_keys"
        keys.write_text(Path(f"{client_key}.pub").read_text())
        keys.chmod(0o644)
        base = HOST_PAM.read_text()
        module = pam_module.build(work / "pam-module")
        nobody = work / "nobody-listens.sock"
        up_line = pam_command(bindir, up_cfg, sock)
        down_line = pam_command(bindir, down_cfg, nobody)
        module_up = module_command(module, bindir, up_cfg, sock)
        module_down = module_command(module, bindir, down_cfg, nobody)
        pam_texts = {
            "no PAM line": base,
            "service up": base + shlex.join(module_up) + "\n",
            "service down": base + shlex.join(module_down) + "\n",
            "pam_exec, service up": base + shlex.join(up_line) + "\n",
            "pam_exec, service down": base + shlex.join(down_line) + "\n",
        }
        cases = list(CASES)
        if args.compare:
            # Another install's tokenlife (an older release, say) in the same rounds.
            for name, line in (
                ("pam_exec, service up, --compare", pam_command(args.compare, up_cfg, sock)),
                ("pam_exec, service down, --compare", pam_command(args.compare, down_cfg, nobody)),
            ):
                pam_texts[name] = base + shlex.join(line) + "\n"
                cases.append(name)
        if args.calibrate:
            # The same pam_exec line running next to nothing: what pam_exec itself
            # costs, and what the interpreter's start costs before tokenlife runs.
            head = up_line[: up_line.index(program(up_line, bindir)[0])]
            for name, argv in CALIBRATION.items():
                argv = [str(bindir / "python") if a == "PYTHON" else a for a in argv]
                pam_texts[name] = base + shlex.join(head + argv) + "\n"
                cases.append(name)
        for name in cases:
            sshds.append(Sshd(work, name, pam_texts[name], host_key, keys, args.sshd_nofile))
        known = work / "known_hosts"
        host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        known.write_text("".join(f"[127.0.0.1]:{s.port} {host_pub}\n" for s in sshds))

        def login(s: Sshd) -> float:
            took = timed_run(
                [
                    "ssh",
                    # No ~/.ssh/config, no /etc/ssh/ssh_config: the same client everywhere.
                    *("-F", "/dev/null", "-i", str(client_key), "-p", str(s.port)),
                    *("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"),
                    *("-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"),
                    f"{user.pw_name}@127.0.0.1",
                    "true",
                ]
            )
            # The session ends after the client has its status (close_session runs
            # the PAM line once more): the next login must not pay for this logout.
            s.wait_idle()
            return took

        for s in sshds:
            for _ in range(args.warmup):
                login(s)
        # The PAM cases did their work: a token file each, the fallback's spool record.
        check_token_file(run / "up" / str(user.pw_uid) / "slurm_jwt", user.pw_uid)
        check_token_file(run / "down" / str(user.pw_uid) / "slurm_jwt", user.pw_uid)
        if not (work / "down-spool" / f"{user.pw_name}.json").exists():
            raise SystemExit("service down: no spool record, so the fallback did not mint")
        if (work / "up-spool").exists():
            raise SystemExit("service up: a spool record, so the service did not answer")

        times: dict[str, list[float]] = {name: [] for name in cases}
        shuffle = random.Random(7).shuffle  # no case always follows the same one
        for i in range(args.runs):
            order = list(sshds)
            shuffle(order)
            for s in order:
                times[s.name].append(login(s))
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{args.runs} rounds", file=sys.stderr)

        direct: dict[str, list[float]] = {}
        if args.direct:
            env = {"PATH": "/usr/bin:/bin", "PAM_TYPE": "open_session", "PAM_USER": user.pw_name}
            argvs = {
                "python -c pass (the interpreter's start)": [str(bindir / "python"), "-c", "pass"],
                "pam_exec's command, service up": program(up_line, bindir),
                "pam_exec's command, service down": program(down_line, bindir),
                "the module's fallback (service down)": [
                    str(bindir / "tokenlife"),
                    *("-c", str(down_cfg), "pam", "--no-service"),
                ],
            }
            direct = {name: [] for name in argvs}
            for _ in range(args.runs):
                for name, argv in argvs.items():
                    direct[name].append(timed_run(argv, env))
    finally:
        for s in sshds:
            s.stop()
        if service is not None:
            service.terminate()
            service.wait(15)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    if HOST_PAM.read_bytes() != host_pam:
        raise SystemExit(f"{HOST_PAM} changed during the run")

    mode = "a new token at every login" if args.fresh else "the user's token reused"
    nofile = args.sshd_nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    print(
        f"\nssh logins ({args.runs} per case, alternating; {mode}; {os.cpu_count()} CPUs; "
        f"sshd hard RLIMIT_NOFILE {nofile})\n"
        "milliseconds; +ms = median - no-PAM median, overhead = that / no-PAM median, with a\n"
        "90% bootstrap interval; paired = median of the per-round differences\n"
    )
    base = times["no PAM line"]
    base_med = statistics.median(base)
    rows = []
    for name, samples in times.items():
        med = statistics.median(samples)
        over = (med - base_med) / base_med * 100
        low, high = interval(samples, base)
        paired = statistics.median(a - b for a, b in zip(samples, base, strict=True))
        rows.append(
            [
                name,
                f"{med:.1f}",
                f"{pct(samples, 0.9):.1f}",
                f"{med - base_med:+.1f}",
                f"{over:+.1f} % ({low:+.1f} .. {high:+.1f})",
                f"{paired:+.1f}",
                verdict(over, TARGETS[name]) if name in TARGETS else "",
            ]
            if name != CASES[0]
            else [name, f"{med:.1f}", f"{pct(samples, 0.9):.1f}", "", "", "", ""]
        )
    header = ["case", "p50", "p90", "+ms", "overhead (90% interval)", "paired +ms", "target"]
    print(table(header, rows))
    if direct:
        print(f"\nthe PAM command alone, run directly ({args.runs} runs each; milliseconds)\n")
        rows = [
            [name, f"{statistics.median(s):.1f}", f"{pct(s, 0.9):.1f}"]
            for name, s in direct.items()
        ]
        print(table(["what", "p50", "p90"], rows))
    print(f"\nPAM lines measured: {shlex.join(module_up)}\n    {shlex.join(up_line)}")


if __name__ == "__main__":
    main()

"""The PAM login path, side by side with ``scontrol token`` on one real slurmctld.

What is timed is the command pam_exec runs (``tokenlife pam`` with PAM_TYPE
and PAM_USER set), from process start until it exits with the token file on
disk, exactly as a login pays it; the baseline is ``scontrol token
username=U`` against the same real slurmctld.  Rows:

  service, reuse   the mint service is running; the user's token is still good
  service, fresh   the service mints a new token at every login
  fallback, reuse  no service: the login process mints itself (spool store)
  fallback, fresh
  pamtester        the whole PAM stack (pamtester open_session) for reference

Run as root on a machine with the Slurm packages:  .venv/bin/python bench/bench_pam.py [RUNS]
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.harness.slurm import SlurmCluster  # noqa: E402
from tests.integration.harness.users import ensure_user  # noqa: E402

#: login token files live on tmpfs in production (/run), so here too
RUN_DIR = Path(tempfile.mkdtemp(prefix="tl-bench-run-", dir="/dev/shm"))
TOKENLIFE = ""  # the login path, installed as in production
FULL_TOKENLIFE = str(Path(sys.executable).parent / "tokenlife")  # the service, with its deps


def install_like_production(work: Path) -> str:
    """A regular (not editable) install in a fresh venv of Debian's python.

    The test venv is editable, and setuptools' editable finder costs ~8 ms at
    every interpreter start: a production install has none of that.  The
    login path needs no third-party package, so --no-deps is faithful.
    """
    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = Path(sys.executable).parent / "pip"
    subprocess.run(
        [str(pip), "--python", str(venv / "bin/python"), "install", "-q", "--no-deps", str(REPO)],
        check=True,
        capture_output=True,
    )
    return str(venv / "bin" / "tokenlife")


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, check=False)
        samples.append((time.perf_counter() - start) * 1000)
        if result.returncode != 0:
            raise SystemExit(f"{argv} failed: {result.stderr.decode()}")
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_config(work: Path, name: str, key: Path, fresh: bool) -> Path:
    cfg = work / f"{name}.toml"
    # renew_before longer than the lifetime: every login is due, so every login mints.
    token = '[token]\nlifetime = "1h"\nrenew_until = "2h"\nrenew_before = "90m"\n' if fresh else ""
    cfg.write_text(
        f'[key]\npath = "{key}"\n{token}'
        f'[store]\nurl = "sqlite:///{work}/{name}.db"\nspool_dir = "{work}/{name}-spool"\n'
        f'[login]\ntoken_dir = "{RUN_DIR}/{name}-run"\n'
        f'[producer]\nsocket = "{work}/{name}.sock"\n'
    )
    return cfg


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    if os.geteuid() != 0:
        raise SystemExit("run as root: it starts a real Slurm cluster")
    user = ensure_user("tlalice").pw_name
    work = Path(tempfile.mkdtemp(prefix="tl-bench-pam-"))
    work.chmod(0o755)
    key = work / "jwt_hs256.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    rows: list[tuple[str, list[float]]] = []
    global TOKENLIFE
    TOKENLIFE = install_like_production(work)
    services: list[subprocess.Popen[bytes]] = []
    pam_service = f"tokenlife-bench-{os.getpid()}"
    try:
        with SlurmCluster(work / "slurm", key) as cluster:
            env = {**os.environ, **cluster.env()}
            rows.append(
                (
                    "scontrol token (baseline)",
                    timed(["scontrol", "token", f"username={user}", "lifespan=3600"], env, runs),
                )
            )
            python = str(Path(TOKENLIFE).parent / "python")
            rows.append(
                ("python -c pass (interpreter floor)", timed([python, "-c", "pass"], env, runs))
            )
            for mode in ("reuse", "fresh"):
                cfg = write_config(work, f"svc-{mode}", key, mode == "fresh")
                sock = work / f"svc-{mode}.sock"
                services.append(
                    subprocess.Popen(
                        [FULL_TOKENLIFE, "-c", str(cfg), "serve"], stderr=subprocess.DEVNULL
                    )
                )
                deadline = time.monotonic() + 20
                while not sock.exists():
                    if time.monotonic() > deadline:
                        raise SystemExit("mint service did not start")
                    time.sleep(0.05)
                pam_env = {"PATH": env["PATH"], "PAM_TYPE": "open_session", "PAM_USER": user}
                argv = [TOKENLIFE, "pam", "--socket", str(sock)]
                timed(argv, pam_env, 3)  # warm up: first mint, page cache
                rows.append((f"tokenlife pam: service, {mode}", timed(argv, pam_env, runs)))
            for mode in ("reuse", "fresh"):
                cfg = write_config(work, f"fb-{mode}", key, mode == "fresh")
                argv = [TOKENLIFE, "-c", str(cfg), "pam", "--socket", str(work / "absent.sock")]
                timed(argv, pam_env, 3)
                rows.append((f"tokenlife pam: fallback, {mode}", timed(argv, pam_env, runs)))
            if shutil.which("pamtester"):
                Path(f"/etc/pam.d/{pam_service}").write_text(
                    "auth required pam_permit.so\naccount required pam_permit.so\n"
                    f"session required pam_exec.so quiet {TOKENLIFE} pam "
                    f"--socket {work / 'svc-reuse.sock'}\n"
                )
                rows.append(
                    (
                        "pamtester open_session (service, reuse)",
                        timed(["pamtester", pam_service, user, "open_session"], env, runs),
                    )
                )
    finally:
        for proc in services:
            proc.terminate()
            proc.wait(10)
        Path(f"/etc/pam.d/{pam_service}").unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(RUN_DIR, ignore_errors=True)

    base = statistics.median(rows[0][1])
    print(f"\nPAM login path vs scontrol token, {runs} runs each")
    print("(milliseconds; ratio = p50 / baseline p50)\n")
    print(f"{'what':<42} {'p50':>8} {'p95':>8} {'ratio':>7}")
    for name, samples in rows:
        med = statistics.median(samples)
        print(f"{name:<42} {med:8.1f} {p(samples, 0.95):8.1f} {med / base:6.2f}x")
    print("\ntarget: tokenlife pam <= 5x scontrol token")
    return 0


if __name__ == "__main__":
    sys.exit(main())

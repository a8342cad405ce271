"""The worker side's costs: ``tokenlife-engine env`` per task, and ``run`` idle.

1. env: wall time of ``tokenlife-engine env`` exactly as the TaskProlog runs
   it (the installed console script, with its wrapper and site imports, a
   real config file with an [engine] table and a real delivered token file),
   side by side with the same interpreter's ``python -c pass`` in the same
   run, interleaved so both see the same machine.  Also the whole shipped
   TaskProlog script (``sh`` + the engine).  p50 and p95 over --runs runs
   (default 100).  Target: engine env p50 <= 2x ``python -c pass``.
2. run: ``tokenlife-engine run -- sleep`` left idle for --idle seconds
   (default 60): its RSS (VmRSS, and VmHWM the peak) and its CPU time over the
   idle period from /proc.  Targets: RSS <= 25 MB, CPU <= 0.1%.

Run:     .venv/bin/python bench/bench_engine.py
Quick:   .venv/bin/python bench/bench_engine.py --runs 50 --idle 10
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(user: str, ttl: int) -> str:
    now = int(time.time())
    claims = {"exp": now + ttl, "iat": now, "sun": user, "uid": os.getuid()}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


def node(root: Path) -> tuple[dict[str, str], Path]:
    """A token dir with a delivered token, a config, the TaskProlog script."""
    import pwd

    token_dir = root / "run"
    user_dir = token_dir / str(os.getuid())
    user_dir.mkdir(parents=True, mode=0o700)
    token = user_dir / "slurm_jwt"
    token.write_text(make_token(pwd.getpwuid(os.getuid()).pw_name, 3600))
    token.chmod(0o600)
    config = root / "tokenlife.toml"
    config.write_text(
        "# a token host's sections too: the engine reads only [engine]\n"
        '[key]\npath = "/etc/slurm/jwt_hs256.key"\n[token]\nlifetime = "2d"\n'
        f'[engine]\ntoken_dir = "{token_dir}"\nexport_jwt = "steps"\n'
    )
    prolog = root / "taskprolog.sh"
    text = (REPO / "systemd" / "slurm" / "taskprolog.sh").read_text()
    prolog.write_text(
        text.replace("/usr/local/bin/tokenlife-engine", str(BIN / "tokenlife-engine"))
    )
    prolog.chmod(0o755)
    # As slurmd gives it: the job's environment plus the task's variables.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TOKENLIFE_CONFIG": str(config),
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_UID": str(os.getuid()),
        "SLURM_JOB_USER": pwd.getpwuid(os.getuid()).pw_name,
    }
    return env, prolog


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with {proc.returncode}")
    return elapsed


def bench_env(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env, prolog = node(Path(tmp))
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "tokenlife-engine env": [str(BIN / "tokenlife-engine"), "env"],
            "TaskProlog script": [str(prolog)],
        }
        out = subprocess.run(cases["tokenlife-engine env"], env=env, capture_output=True, text=True)
        if "export SLURM_JWT=" not in out.stdout:
            raise SystemExit(f"the engine exported no token: {out.stdout!r} {out.stderr!r}")
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(3):  # warm the page cache
            for argv in cases.values():
                timed(argv, env)
        for _ in range(runs):
            for name, argv in cases.items():
                samples[name].append(timed(argv, env))
    base = statistics.median(samples["python -c pass"])
    print(f"\nenv: {runs} runs each, interleaved")
    print(f"{'command':24} {'p50 ms':>8} {'p95 ms':>8} {'p50 vs python -c pass':>22}")
    for name, values in samples.items():
        p50 = statistics.median(values)
        p95 = statistics.quantiles(values, n=20)[18]
        print(f"{name:24} {p50 * 1e3:8.1f} {p95 * 1e3:8.1f} {p50 / base:21.2f}x")
    print("target: tokenlife-engine env p50 <= 2.00x python -c pass")


def _proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])  # kB
    return fields


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def bench_run(idle: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env, _ = node(Path(tmp))
        argv = [str(BIN / "tokenlife-engine"), "run", "--", "sleep", str(idle + 30)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        try:
            time.sleep(2)  # started, copy written, watching
            if proc.poll() is not None:
                raise SystemExit(f"run exited early with {proc.returncode}")
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle)
            cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
            status = _proc_status(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    share = (cpu1 - cpu0) / (t1 - t0) * 100
    print(f"\nrun: supervisor idle for {t1 - t0:.0f} s (child: sleep)")
    print(f"{'RSS MB':>8} {'peak RSS MB':>12} {'CPU %':>8}")
    print(f"{status['VmRSS'] / 1024:8.1f} {status['VmHWM'] / 1024:12.1f} {share:8.3f}")
    print("targets: RSS <= 25 MB, CPU <= 0.1%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="env runs per command (>= 50)")
    parser.add_argument("--idle", type=float, default=60, help="seconds run stays idle")
    parser.add_argument("--only", choices=("env", "run"), help="one part only")
    args = parser.parse_args()
    if args.only != "run":
        bench_env(args.runs)
    if args.only != "env":
        bench_run(args.idle)


if __name__ == "__main__":
    main()

"""What the Slurm command wrappers cost per call, over the real command.

The real Debian Slurm clients (``squeue``, ``srun``, ``scontrol``; their
``--version`` needs no cluster, so the comparison is of start-up, which is
what the wrapper adds), each run directly and through the wrapper installed
by ``tokenlife-engine install-wrappers``, interleaved in one run so both see
the same machine.  Three wrapper paths:

* ``srun``: drops SLURM_JWT (no other program runs);
* ``squeue``, steady: SLURM_JWT equals the token file (no other program runs);
* ``squeue``, after a renewal: the file holds a newer token, one ``awk``
  compares the claims and the newer token is handed on.

p50 and p95 of the wall time over --runs runs (default 200), and the p50
overhead in milliseconds.  Target (issue 13): at most 5 ms per call.

Run:     .venv/bin/python bench/bench_wrappers.py
Quick:   .venv/bin/python bench/bench_wrappers.py --runs 50
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from client_engine import wrappers  # noqa: E402 - after the path is set


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(user: str, ttl: int) -> str:
    now = int(time.time())
    claims = {"iat": now, "exp": now + ttl, "sun": user, "uid": 1001, "gid": 1001}
    claims["id"] = {"gecos": "", "dir": f"/home/{user}", "shell": "/bin/bash", "gids": [1001]}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    real_bin = Path(shutil.which("squeue") or "/usr/bin/squeue").parent
    for name in ("squeue", "srun", "scontrol"):
        if not (real_bin / name).exists():
            sys.exit(f"{name} not found: install slurm-client")
    with tempfile.TemporaryDirectory(prefix="tl-bench-wrappers-") as tmp:
        root = Path(tmp)
        wrapper_dir = root / "wrappers"
        wrappers.install(str(wrapper_dir))
        token_file = root / "slurm_jwt"
        old, new = make_token("alice", 60), make_token("alice", 600)
        token_file.write_text(new)
        token_file.chmod(0o600)
        # Every Slurm client gets SLURM_CONF: without it, it looks for its
        # controller in DNS, which must never leave this machine.
        conf = root / "slurm.conf"
        conf.write_text(
            "ClusterName=bench\nSlurmctldHost=localhost(127.0.0.1)\n"
            "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n"
        )
        base = {"PATH": f"{wrapper_dir}:{real_bin}:/usr/bin:/bin", "LANG": "C"}
        base["SLURM_CONF"] = str(conf)
        base["SLURM_JWT_FILE"] = str(token_file)
        cases = [
            ("srun (drops SLURM_JWT)", "srun", new),
            ("squeue, steady", "squeue", new),
            ("squeue, after a renewal", "squeue", old),
            ("scontrol, steady", "scontrol", new),
        ]
        times: dict[str, tuple[list[float], list[float]]] = {c[0]: ([], []) for c in cases}
        for _ in range(args.runs):
            for label, name, jwt in cases:
                env = {**base, "SLURM_JWT": jwt}
                times[label][0].append(timed([str(real_bin / name), "--version"], env))
                times[label][1].append(timed([name, "--version"], env))
    load = os.getloadavg()[0]
    print(f"Slurm command wrappers, {args.runs} runs each, interleaved (load {load:.2f})")
    print(
        f"{'case':<26} {'real p50':>9} {'real p95':>9} {'wrap p50':>9} {'wrap p95':>9} "
        f"{'overhead':>9} {'ratio':>6}"
    )
    for label, (real, wrapped) in times.items():
        r50, w50 = statistics.median(real), statistics.median(wrapped)
        r95 = statistics.quantiles(real, n=20)[-1]
        w95 = statistics.quantiles(wrapped, n=20)[-1]
        cells = [f"{v * 1e3:10.2f}" for v in (r50, r95, w50, w95, w50 - r50)]
        print(f"{label:<26}" + "".join(cells) + f"{w50 / r50:9.2f}x")
    print("target: overhead <= 5 ms per call (p50)")


if __name__ == "__main__":
    main()

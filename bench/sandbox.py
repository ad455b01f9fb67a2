#!/usr/bin/env python3
"""`lkvm sandbox -- CMD`, cold (`--cold`: a boot per run) against warm (restoring the snapshot
of a guest ready for a job that the first warm run leaves in the cache), alternating, in a fresh
HOME: wall time of the whole command, median of the runs. The job itself (the host's CMD run
through 9p) costs the same both ways, so a second command, `true`, shows it.

    bench/sandbox.py [--runs 3]"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GUEST, HOST_PARAMS, LKVM  # noqa: E402


def sandbox(home, extra, command):
    args = [LKVM, "sandbox", *extra, "-d", "lkvm-sandbox-bench", "-k", os.path.join(GUEST, "vmlinux"), "-m", "256", "-c", "1",
            "-p", HOST_PARAMS, "--", *command]
    env = dict(os.environ, HOME=home, XDG_CACHE_HOME="")
    start = time.monotonic()
    done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=1500)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.decode(errors='replace')}")
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="lkvm-sandbox-bench-")
    subprocess.run([LKVM, "setup", "lkvm-sandbox-bench"], env=dict(os.environ, HOME=home), check=True, capture_output=True)
    fill = sandbox(home, [], ["true"])
    print(f"first warm run (boots, snapshots the ready guest, runs the job): {fill:.1f} s")
    print("| command | cold (s) | warm (s) | warm / cold |")
    print("|---|---|---|---|")
    for command in (["true"], ["/bin/sh", "-c", "echo hello"]):
        cold, warm = [], []
        for _ in range(args.runs):
            cold.append(sandbox(home, ["--cold"], command))
            warm.append(sandbox(home, [], command))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"| `{' '.join(command)}` | {c:.1f} | {w:.1f} | {w / c:.2f} |")
    shutil.rmtree(home)


if __name__ == "__main__":
    main()

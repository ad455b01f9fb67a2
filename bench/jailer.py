#!/usr/bin/env python3
"""A jailed start, as Kata starts Firecracker: lkvm's jailer and lkvm against Firecracker's
jailer and a static Firecracker, side by side in one run (alternating). The jail's root holds
the config file and a tiny 64-bit ELF kernel (bench/api.py's, which prints one byte on COM1 and
resets through the i8042); the jailer copies the VMM in, builds /dev, pivots, drops to uid:gid
and execs it with --config-file. Measured: jailer start -> the guest's first output on the
serial console (stdout) and -> the VMM's exit, wall time; and the VMM's peak RSS (VmHWM) when
the guest has printed (the rusage of a child still counts the RSS of the Python that forked it).

    bench/jailer.py --runs 20 [--firecracker PATH --jailer PATH]   (as root)

lkvm's side is target/x86_64-unknown-linux-gnu/release/lkvm, copied as `firecracker` and
linked as `jailer`. Firecracker is not built by this project: build it (static) from its own
repository and pass both binaries."""
import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import PAYLOAD, print_medians  # noqa: E402
from common import LKVM  # noqa: E402

CONFIG = {
    "boot-source": {"kernel_image_path": "/kernel.elf", "boot_args": "console=ttyS0"},
    "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    "drives": [],
}


def one_run(jailer, vmm, base, run_id):
    root = os.path.join(base, os.path.basename(vmm), run_id, "root")
    os.makedirs(root)
    with open(os.path.join(root, "kernel.elf"), "wb") as f:
        f.write(PAYLOAD)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    args = [jailer, "--id", run_id, "--exec-file", vmm, "--uid", "0", "--gid", "0", "--chroot-base-dir", base,
            "--", "--config-file", "/config.json", "--no-api"]
    start = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = hwm = None
    fd = proc.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 10)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        if first is None and b"X" in chunk:
            first = (time.monotonic() - start) * 1000
            hwm = peak_rss_kib(proc.pid)
    _, status = os.waitpid(proc.pid, 0)
    ended = (time.monotonic() - start) * 1000
    if first is None:
        raise RuntimeError(f"{jailer}: no guest output (status {status}): {proc.stderr.read().decode()[-500:]}")
    shutil.rmtree(os.path.join(base, os.path.basename(vmm), run_id))
    return {"first_ms": first, "exit_ms": ended, "rss_kib": hwm}


def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--firecracker", help="a static Firecracker binary built from its repository")
    parser.add_argument("--jailer", help="Firecracker's jailer, built beside it")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the jailer needs root")
    if bool(args.firecracker) != bool(args.jailer):
        sys.exit("give both --firecracker and --jailer, or neither")
    workdir = tempfile.mkdtemp(prefix="lkvm-jailer-bench-")
    lkvm_dir = os.path.join(workdir, "lkvm")
    os.makedirs(lkvm_dir)
    shutil.copy(LKVM, os.path.join(lkvm_dir, "firecracker"))
    os.symlink(LKVM, os.path.join(lkvm_dir, "jailer"))
    vmms = {"lkvm": (os.path.join(lkvm_dir, "jailer"), os.path.join(lkvm_dir, "firecracker"))}
    if args.firecracker:
        fc_dir = os.path.join(workdir, "fc")
        os.makedirs(fc_dir)
        shutil.copy(args.firecracker, os.path.join(fc_dir, "firecracker"))
        vmms["firecracker"] = (os.path.abspath(args.jailer), os.path.join(fc_dir, "firecracker"))
    samples = {name: [] for name in vmms}
    for run in range(args.runs):
        for name, (jailer, vmm) in vmms.items():
            base = os.path.join(workdir, f"jails-{name}")
            samples[name].append(one_run(jailer, vmm, base, f"bench-{run}"))
    shutil.rmtree(workdir)
    metrics = [("jailer start to first guest output (ms)", "first_ms"), ("jailer start to exit (ms)", "exit_ms"),
               ("peak RSS of the VMM when the guest printed (MiB)", "rss_kib")]
    print_medians(args.runs, samples, metrics, scales={"rss_kib": 1 / 1024})


if __name__ == "__main__":
    main()

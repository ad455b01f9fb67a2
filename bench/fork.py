#!/usr/bin/env python3
"""Forking a running guest into N children (lkvm fork) against what Firecracker offers for the
same end: pause, snapshot to files, resume, then N processes loading that snapshot. Side by
side in one run, for each N:

- the parent's pause (lkvm: as `lkvm fork` reports it; Firecracker: PATCH Paused ->
  snapshot create -> PATCH Resumed);
- from the fork (or the snapshot) to every child running its workload again (a new console line
  from each);
- the children's proportional set size (PSS) summed, and the parent's, once all run.

The guest is the test guest's init running a workload that prints a line every 200 ms
(`lkvm.snapwork`), with 1 vCPU.

    bench/fork.py [--counts 1,4,16] [--mem 256] [--firecracker PATH]

Firecracker is not built by this project: build it from its own repository."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GUEST, HOST_PARAMS, LKVM  # noqa: E402
from snapshot import BOOT_TIMEOUT, Vmm, boot_working  # noqa: E402


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0


def wait_for_lines(paths, since, timeout):
    """Seconds from `since` until each file (a child's console log) has a workload line."""
    deadline = time.monotonic() + timeout
    pending = set(paths)
    while pending and time.monotonic() < deadline:
        for path in list(pending):
            try:
                with open(path, "rb") as f:
                    if b"LKVM-WORK" in f.read():
                        pending.discard(path)
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    if pending:
        raise RuntimeError(f"no workload line from {sorted(pending)} within {timeout} s")
    return time.monotonic() - since


def lkvm_fork(home, count, mem):
    env = dict(os.environ, HOME=home)
    args = f"{HOST_PARAMS} lkvm.snapwork=100000"
    parent = subprocess.Popen([LKVM, "run", "-k", os.path.join(GUEST, "vmlinux"), "-i",
                               os.path.join(GUEST, "initramfs.cpio"), "-p", args, "-m", str(mem), "-c", "1",
                               "-n", "mode=none", "--name", "tmpl"],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        for line in parent.stdout:
            if b"LKVM-WORK" in line or time.monotonic() > deadline:
                break
        logs = [os.path.join(home, ".lkvm", f"kid-{k}.log") for k in range(count)]
        started = time.monotonic()
        out = subprocess.run([LKVM, "fork", "-n", "tmpl", "--count", str(count), "--prefix", "kid"], env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"lkvm fork: {out.stderr.strip()}")
        paused_ms = float(out.stdout.split("paused ")[1].split(" ms")[0])
        running_s = wait_for_lines(logs, started, 600)
        pids = [int(json.loads(line)["pid"]) for line in status_lines(env, count)]
        result = {"pause_ms": paused_ms, "running_s": running_s,
                  "children_pss_mib": sum(pss_kib(p) for p in pids) / 1024, "parent_pss_mib": pss_kib(parent.pid) / 1024}
        subprocess.run([LKVM, "stop", "-a"], env=env, capture_output=True, timeout=60)
        return result
    finally:
        parent.kill()
        parent.wait()


def status_lines(env, count):
    """Each child's control-socket status response (a JSON line with its pid)."""
    lines = []
    for k in range(count):
        sock = os.path.join(env["HOME"], ".lkvm", f"kid-{k}.sock")
        out = subprocess.run(["python3", "-c", STATUS, sock], capture_output=True, text=True, timeout=10)
        lines.append(out.stdout.strip())
    return lines


STATUS = """import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"version":1,"command":"status"}\\n'); print(s.makefile().readline())"""


def firecracker_clones(binary, workdir, count, mem):
    vm = boot_working(binary, workdir, "parent", mem, 1)
    state, memory = os.path.join(workdir, "fc.state"), os.path.join(workdir, "fc.mem")
    started = time.monotonic()
    vm.api("PATCH", "/vm", {"state": "Paused"})
    vm.api("PUT", "/snapshot/create", {"snapshot_path": state, "mem_file_path": memory})
    vm.api("PATCH", "/vm", {"state": "Resumed"})
    pause_ms = (time.monotonic() - started) * 1000
    clones = []
    for k in range(count):
        clone = Vmm(binary, workdir, f"clone{k}")
        clone.api("PUT", "/snapshot/load", {"snapshot_path": state, "resume_vm": True,
                                            "mem_backend": {"backend_type": "File", "backend_path": memory}})
        clones.append(clone)
    for clone in clones:
        clone.wait_line(b"LKVM-WORK", 600)
    running_s = time.monotonic() - started
    result = {"pause_ms": pause_ms, "running_s": running_s,
              "children_pss_mib": sum(pss_kib(c.proc.pid) for c in clones) / 1024,
              "parent_pss_mib": pss_kib(vm.proc.pid) / 1024}
    for v in clones + [vm]:
        v.end()
    os.unlink(memory)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--mem", type=int, default=256, help="guest size in MiB")
    parser.add_argument("--firecracker", help="a Firecracker binary built from its repository")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = tempfile.mkdtemp(prefix="lkvm-fork-bench-")
    columns = ["lkvm fork"] + (["firecracker snapshot + loads", "lkvm / firecracker"] if args.firecracker else [])
    print(f"{args.mem} MiB guest, 1 vCPU")
    print("| N | metric | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    try:
        for count in [int(c) for c in args.counts.split(",")]:
            home = os.path.join(workdir, f"home-{count}")
            os.makedirs(home)
            ours = lkvm_fork(home, count, args.mem)
            theirs = firecracker_clones(os.path.abspath(args.firecracker), workdir, count, args.mem) if args.firecracker else None
            for key, label in [("pause_ms", "parent paused (ms)"), ("running_s", "fork to every child running (s)"),
                               ("children_pss_mib", "children's PSS, summed (MiB)"), ("parent_pss_mib", "parent's PSS (MiB)")]:
                cells = [f"{ours[key]:.1f}"]
                if theirs:
                    cells += [f"{theirs[key]:.1f}", f"{ours[key] / theirs[key]:.2f}" if theirs[key] else "-"]
                print(f"| {count} | {label} | " + " | ".join(cells) + " |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

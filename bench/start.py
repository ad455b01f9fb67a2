#!/usr/bin/env python3
"""Start-up benchmark: lkvm against kvmtool on a flat real-mode payload, side by side in one run.

- Start to exit: a 15-byte payload that prints "hi" on COM1 and resets through the i8042; wall
  time from fork to the VMM's exit and the CPU time it used (user + system, from wait4), runs
  alternating between the VMMs, medians and ratios.
- Many at once: `--many` VMs (default 20) of a payload that prints "hi" and halts, started
  together. VMs started per second per host core (until every one has printed "hi"), and each
  VMM's memory beyond its guest RAM once all are up (RSS, PSS and private memory, each less the
  guest RAM mapping's, from smaps), medians.

- The floor: bench/floor.c, built here with gcc, makes only the KVM objects both VMMs make for
  the payload (VM, irqchip, PIT, RAM, one vCPU with the supported CPUID) and runs it. Its
  column is what any VMM pays; each VMM's own share is its figure less the floor's.

Usage: bench/start.py --kvmtool PATH [--runs N] [--many N]
(kvmtool's x86 CPU check refuses nested hosts whose CPUID lacks vmx/svm; build it with that check
removed for this host.)
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

from common import LKVM

GUEST_MIB = 16
HELLO = bytes([0xba, 0xf8, 0x03, 0xb0, ord("h"), 0xee, 0xb0, ord("i"), 0xee])  # mov dx,0x3f8; out "h", "i"
RESET = bytes([0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe])  # i8042 pulse reset line, then spin
HALT = bytes([0xfa, 0xf4, 0xeb, 0xfd])  # cli; hlt; jmp hlt


def payload(code):
    f = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
    f.write(code)
    f.close()
    return f.name


def build_floor(directory):
    binary = os.path.join(directory, "floor")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source], check=True)
    return binary


def run_cmd(vmm):
    """kvmtool's `run` command line, which lkvm shares: (kernel, name) -> argv."""
    # kvmtool gives a flat binary no NIC; lkvm follows it.
    return lambda kernel, name: [vmm, "run", "-k", kernel, "-m", str(GUEST_MIB), "-c", "1", "--name", name]


def floor_cmd(floor):
    return lambda kernel, _name: [floor, kernel, str(GUEST_MIB)]


def beyond_floor(lkvm, kvmtool, floor):
    """lkvm's share beyond the floor against kvmtool's."""
    return (lkvm - floor) / (kvmtool - floor)


def time_per_vm_beyond_floor(lkvm, kvmtool, floor):
    """For VMs per second (more is better): the time per VM beyond the floor's."""
    return beyond_floor(1 / lkvm, 1 / kvmtool, 1 / floor)


def start_to_exit(command):
    """(wall ms, CPU ms) of one run to exit."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{command} exited with status {status}")
    return (time.monotonic() - start) * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def beyond_guest_mib(pid):
    """{RSS, PSS, private}: each less its part in mappings at least as large as guest RAM, in MiB.
    RSS counts the binary's and libraries' pages, which all VMs share, in full for each; PSS
    divides them among the processes that map them; private counts only this VMM's own pages."""
    kinds = {"Rss": "rss", "Pss": "pss", "Private_Clean": "private", "Private_Dirty": "private"}
    total = {"rss": 0, "pss": 0, "private": 0}
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Size":
                size = int(rest.split()[0])
            elif key in kinds and size < GUEST_MIB * 1024:
                total[kinds[key]] += int(rest.split()[0])
    return {k: v / 1024 for k, v in total.items()}


def many_at_once(cmd, kernel, count):
    """(VMs started per second per core, median MiB beyond guest RAM by kind, how many died) for
    `count` VMs started together."""
    start = time.monotonic()
    procs = [subprocess.Popen(cmd(kernel, f"bench-start-{i}"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) for i in range(count)]
    try:
        # The payload prints "hi" from its first instructions: the VM is up.
        up = [p for p in procs if p.stdout.read(2) == b"hi"]
        elapsed = time.monotonic() - start
        time.sleep(0.2)  # let late threads settle before reading memory
        extra = [beyond_guest_mib(p.pid) for p in up if p.poll() is None]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    died = [p.returncode for p in procs if p not in up]
    memory = {kind: statistics.median(m[kind] for m in extra) for kind in ("rss", "pss", "private")}
    return len(up) / elapsed / os.cpu_count(), memory, died


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvmtool", required=True, help="kvmtool's lkvm binary")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--many", type=int, default=20)
    args = ap.parse_args()
    reset, halt = payload(HELLO + RESET), payload(HELLO + HALT)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-start-") as scratch:
            vmms = {"lkvm": run_cmd(LKVM), "kvmtool": run_cmd(args.kvmtool),
                    "floor": floor_cmd(build_floor(scratch))}
            runs = {name: [] for name in vmms}
            for i in range(args.runs):
                for name, cmd in vmms.items():  # alternating, so drift hits all alike
                    runs[name].append(start_to_exit(cmd(reset, f"bench-start-{i}")))
            many = {name: many_at_once(cmd, halt, args.many) for name, cmd in vmms.items()}
    finally:
        os.unlink(reset)
        os.unlink(halt)

    medians = {name: {"wall": statistics.median(w for w, _ in r), "cpu": statistics.median(c for _, c in r)}
               for name, r in runs.items()}
    print(f"\nStart-up: flat payload, -m {GUEST_MIB} -c 1, {args.runs} alternating runs each, medians; "
          f"{args.many} VMs at once on {os.cpu_count()} cores")
    print("| metric | lkvm | kvmtool | floor | lkvm / kvmtool | lkvm's own / kvmtool's own |")
    print("|---|---|---|---|---|---|")
    # Wall time has no floor: how long the kernel's VM teardown waits depends on timing (below),
    # so the floor may take longer than a VMM.
    rows = [("start to exit, wall (ms)", None, [medians[n]["wall"] for n in vmms]),
            ("start to exit, CPU (ms)", beyond_floor, [medians[n]["cpu"] for n in vmms]),
            (f"{args.many} at once: VMs started per second per core", time_per_vm_beyond_floor,
             [many[n][0] for n in vmms]),
            *((f"{args.many} at once: {label} beyond guest RAM per VM (MiB)", beyond_floor,
               [many[n][1][kind] for n in vmms]) for kind, label in (("rss", "RSS"), ("pss", "PSS"), ("private", "private")))]
    for label, own_share, (lkvm, kvmtool, floor) in rows:
        own = f"{own_share(lkvm, kvmtool, floor):.2f}" if own_share else "-"
        print(f"| {label} | {lkvm:.1f} | {kvmtool:.1f} | {floor:.1f} | {lkvm / kvmtool:.2f} | {own} |")
    # The kernel's teardown of a VM waits for SRCU grace periods, expedited or not by timing:
    # start to exit can be bimodal, hence the quartiles.
    for name, r in runs.items():
        quartiles = statistics.quantiles(sorted(w for w, _ in r), n=4)
        print(f"{name}: start to exit, wall quartiles {' / '.join(f'{q:.1f}' for q in quartiles)} ms")
    for name, (_, _, died) in many.items():
        if died:
            print(f"{name}: {len(died)} of {args.many} VMs died before starting (exit statuses {died})")


if __name__ == "__main__":
    main()

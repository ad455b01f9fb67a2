#!/usr/bin/env python3
"""Boot benchmark: lkvm against QEMU (microvm, PVH) on the same kernel and initramfs, side by
side in one run, reported as medians and ratios.

Per VMM and run: wall time from process start to the guest init's first result line on the
serial console (the same point for both VMMs), wall time to process exit, peak RSS, and peak
RSS less the resident part of the guest RAM mapping (the VMM's own overhead). For lkvm also
its boot-marker time. (bench/start.py measures start-up on a flat payload against kvmtool.)

With --kvmtool PATH, two more columns boot the bzImage of the same build, which kvmtool needs
(it loads no vmlinux): lkvm and kvmtool, each with its own default devices and command line.

With --initcalls, one more boot per VMM with `initcall_debug`: the guest's own measure of each
kernel initcall, and the initcalls whose time differs most between lkvm and the others. That
tells the guest's work for the devices a VMM gives it from the VMM's own cost. (The console
output it makes slows every boot alike.)

Usage: bench/boot.py [--runs N] [--kvmtool PATH] [--initcalls]
(after scripts/install-deps.sh --bench and guest/build.sh)
"""
import argparse
import re
import sys

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, MEM_MIB, med, qemu_base, run

INITCALL_PARAMS = "initcall_debug ignore_loglevel"


def lkvm_cmd(params=HOST_PARAMS, kernel="vmlinux"):
    return [LKVM, "run", "-k", f"{GUEST}/{kernel}", "-i", f"{GUEST}/initramfs.cpio", "-m", str(MEM_MIB),
            "-c", "1", "--loglevel", "info", "-p", params]


def qemu_cmd(params=HOST_PARAMS):
    return qemu_base() + ["-append", f"{LKVM_DEFAULTS} {params}"]


def kvmtool_cmd(path, params=HOST_PARAMS):
    return [path, "run", "-k", f"{GUEST}/bzImage", "-i", f"{GUEST}/initramfs.cpio", "-m", str(MEM_MIB), "-c", "1",
            "-p", params]


def initcall_times(lines):
    """Microseconds per initcall, as the guest kernel measured them."""
    times = {}
    for line in lines:
        m = re.search(r"initcall (\S+?)\+\S* returned \S+ after (\d+) usecs", line)
        if m:
            times[m.group(1)] = times.get(m.group(1), 0) + int(m.group(2))
    return times


def print_initcalls(times, top=12):
    names = list(times)
    print(f"\nGuest initcall time (ms, initcall_debug), one boot each; the {top} largest differences from lkvm")
    print("| initcall | " + " | ".join(names) + " |")
    print("|---" * (1 + len(names)) + "|")
    print("| all initcalls | " + " | ".join(f"{sum(t.values()) / 1e3:.0f}" for t in times.values()) + " |")
    base = times["lkvm"]
    calls = set().union(*times.values())
    spread = {c: max(abs(base.get(c, 0) - t.get(c, 0)) for t in times.values()) for c in calls}
    for call in sorted(calls, key=lambda c: -spread[c])[:top]:
        print(f"| {call} | " + " | ".join(f"{t.get(call, 0) / 1e3:.0f}" for t in times.values()) + " |")



def fmt(v, unit):
    return "-" if v is None else f"{v:.2f}{unit}" if unit == " s" else f"{v:.1f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kvmtool", help="a kvmtool lkvm binary to boot the bzImage with")
    ap.add_argument("--initcalls", action="store_true", help="one more boot each, with initcall_debug")
    args = ap.parse_args()
    commands = {"lkvm": lkvm_cmd, "qemu": qemu_cmd}
    if args.kvmtool:
        commands["lkvm bzImage"] = lambda params=HOST_PARAMS: lkvm_cmd(params, "bzImage")
        commands["kvmtool bzImage"] = lambda params=HOST_PARAMS: kvmtool_cmd(args.kvmtool, params)
    results = {name: [] for name in commands}
    for i in range(args.runs):
        # Interleaved, so drift in machine load hits all alike.
        for name, cmd in commands.items():
            r = run(cmd(), timeout=900)
            results[name].append(r)
            print(f"run {i + 1} {name}: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 2)}"
                                                    for k, v in r.items() if k != "lines"), file=sys.stderr)

    rows = [("start to init (s)", "init", " s"), ("start to exit (s)", "exit", " s"),
            ("peak RSS (MiB)", "rss", " MiB"), ("RSS less guest RAM (MiB)", "overhead", " MiB")]
    # Each lkvm column against the other VMM booting the same kernel file.
    pairs = [("lkvm", "qemu", "QEMU microvm")]
    if args.kvmtool:
        pairs.append(("lkvm bzImage", "kvmtool bzImage", "kvmtool"))
    print(f"\nBoot benchmark: {args.runs} runs each, -m {MEM_MIB} -c 1, initramfs, medians; "
          "lkvm and QEMU boot the PVH vmlinux")
    print("| metric | " + " | ".join(results) + " | " + " | ".join(f"{a} / {label}" for a, _, label in pairs) + " |")
    print("|---" * (1 + len(results) + len(pairs)) + "|")
    for label, key, unit in rows:
        medians = {name: med(r[key] for r in runs) for name, runs in results.items()}
        ratios = [f"{medians[a] / medians[b]:.2f}" if medians[a] is not None and medians[b] else "-"
                  for a, b, _ in pairs]
        print(f"| {label} | " + " | ".join(fmt(m, unit) for m in medians.values()) + " | " + " | ".join(ratios) + " |")
    print(f"| lkvm boot marker (s) | {fmt(med(r['marker'] for r in results['lkvm']), ' s')} |")
    bad = [(n, r["code"]) for n in results for r in results[n] if r["code"] != 0]
    if bad:
        print(f"non-zero exits: {bad}", file=sys.stderr)
    if args.initcalls:
        print_initcalls({name: initcall_times(run(cmd(f"{HOST_PARAMS} {INITCALL_PARAMS}"), timeout=900)["lines"])
                         for name, cmd in commands.items()})


if __name__ == "__main__":
    main()

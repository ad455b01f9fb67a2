#!/usr/bin/env python3
"""Boot benchmark: lkvm against QEMU (microvm, PVH) on the same kernel and initramfs, side by
side in one run, reported as medians and ratios.

Per VMM and run: wall time from process start to the guest init's first result line on the
serial console (the same point for both VMMs), wall time to process exit, peak RSS, and peak
RSS less the resident part of the guest RAM mapping (the VMM's own overhead). For lkvm also
its boot-marker time. (bench/start.py measures start-up on a flat payload against kvmtool.)

Usage: bench/boot.py [--runs N] (after scripts/install-deps.sh --bench and guest/build.sh)
"""
import argparse
import sys

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, MEM_MIB, med, qemu_base, run


def lkvm_cmd():
    return [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", str(MEM_MIB),
            "-c", "1", "--loglevel", "info", "-p", HOST_PARAMS]


def qemu_cmd():
    return qemu_base() + ["-append", f"{LKVM_DEFAULTS} {HOST_PARAMS}"]



def fmt(v, unit):
    return "-" if v is None else f"{v:.2f}{unit}" if unit == " s" else f"{v:.1f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results = {"lkvm": [], "qemu": []}
    for i in range(args.runs):
        # Interleaved, so drift in machine load hits both alike.
        for name, cmd in (("lkvm", lkvm_cmd()), ("qemu", qemu_cmd())):
            r = run(cmd)
            results[name].append(r)
            print(f"run {i + 1} {name}: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 2)}"
                                                    for k, v in r.items() if k != "lines"), file=sys.stderr)

    rows = [("start to init (s)", "init", " s"), ("start to exit (s)", "exit", " s"),
            ("peak RSS (MiB)", "rss", " MiB"), ("RSS less guest RAM (MiB)", "overhead", " MiB")]
    print(f"\nBoot benchmark: {args.runs} runs each, -m {MEM_MIB} -c 1, PVH vmlinux + initramfs, medians")
    print(f"| metric | lkvm | QEMU microvm | lkvm / QEMU |")
    print(f"|---|---|---|---|")
    for label, key, unit in rows:
        a, b = med(r[key] for r in results["lkvm"]), med(r[key] for r in results["qemu"])
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"| {label} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    print(f"| lkvm boot marker (s) | {fmt(med(r['marker'] for r in results['lkvm']), ' s')} | | |")
    bad = [(n, r["code"]) for n in results for r in results[n] if r["code"] != 0]
    if bad:
        print(f"non-zero exits: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()

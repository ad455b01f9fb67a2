#!/usr/bin/env python3
"""9p benchmark: guest user space reads a file from a virtio-9p share (1 MiB reads) and
creates, stats and deletes small files in it, lkvm against QEMU's virtio-9p (`-fsdev local`),
same kernel, initramfs, directory and mount options, side by side, as ratios.

Usage: bench/p9.py [--runs N] [--mib M] [--files F]
"""
import argparse
import shutil
import sys
import tempfile

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, med, qemu_base, ratio_table, results, run

TESTS = [("read", "MB/s"), ("meta", "ops/s")]


def parse(value, unit):
    """'12.34MB/s,...' -> 12.34"""
    if value is None or value.startswith("err"):
        return None
    return float(value.split(unit)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=200)
    args = ap.parse_args()
    share = tempfile.mkdtemp(prefix="lkvm-p9bench-", dir="/var/tmp")
    with open(f"{share}/big", "wb") as f:
        f.write(bytes(range(256)) * (args.mib << 12))
    params = f"{HOST_PARAMS} lkvm.p9bench=bench:{args.files}"
    base = [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1",
            "-n", "mode=none", "--9p", f"{share},bench"]
    vmms = {
        "lkvm mmio": base + ["--virtio-transport", "mmio", "-p", params],
        "lkvm pci": base + ["-p", params],
        "QEMU mmio": qemu_base() + ["-fsdev", f"local,id=fs0,path={share},security_model=passthrough",
                                    "-device", "virtio-9p-device,fsdev=fs0,mount_tag=bench",
                                    "-append", f"{LKVM_DEFAULTS} {params}"],
    }
    table = {name: {t: [] for t, _ in TESTS} for name in vmms}
    for i in range(args.runs):
        for name, cmd in vmms.items():
            r = results(run(cmd)["lines"])
            for t, unit in TESTS:
                table[name][t].append(parse(r.get(f"p9bench:{t}"), unit))
            print(f"run {i + 1} {name}: " + ", ".join(f"{t}={r.get('p9bench:' + t)}" for t, _ in TESTS), file=sys.stderr)
    shutil.rmtree(share)

    print(f"\n9p benchmark: {args.runs} runs each; read of a {args.mib} MiB file, create+stat+unlink of "
          f"{args.files} files; medians")
    ratio_table([(f"{t} ({unit})", {name: med(table[name][t]) for name in vmms}) for t, unit in TESTS],
                list(vmms), "QEMU mmio")


if __name__ == "__main__":
    main()

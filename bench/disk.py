#!/usr/bin/env python3
"""Disk benchmark: guest-side O_DIRECT throughput of a virtio-blk disk (sequential 1 MiB and
random 4 KiB reads and writes, measured by the test guest's init in user space), lkvm
(virtio-mmio and virtio-pci; raw with the sync and the io_uring engine, and qcow2) against QEMU
microvm (virtio-mmio; raw and qcow2), same kernel, initramfs and images, side by side; then
lkvm's block device model alone on the host (requests per second, engines at depth 1 and 32).

Usage: bench/disk.py [--runs N] [--mib M]
"""
import argparse
import os
import subprocess
import sys
import tempfile

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, ROOT, med, qemu_base, ratio_table, results, run

TESTS = ["seq_write", "seq_read", "rand_write_4k", "rand_read_4k"]


def parse(value):
    """'12.34MB/s,1.234s' -> 12.34"""
    if value is None or value.startswith("err"):
        return None
    return float(value.split("MB/s")[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=32)
    args = ap.parse_args()
    image = tempfile.NamedTemporaryFile(suffix=".img", delete=False, dir="/var/tmp")
    image.truncate(args.mib << 20)
    image.close()
    qcow2 = image.name + ".qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, f"{args.mib}M"], check=True)
    params = f"{HOST_PARAMS} lkvm.blkbench=/dev/vda:{args.mib}"
    lkvm_pci = [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1",
                "-p", params, "-d"]
    vmms = {
        "lkvm mmio": [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1",
                      "--virtio-transport", "mmio", "-d", image.name, "-p", params],
        "lkvm pci": lkvm_pci + [image.name],
        "lkvm pci async": lkvm_pci + [image.name + ",async"],
        "lkvm pci qcow2": lkvm_pci + [qcow2],
        "QEMU mmio": qemu_base() + ["-drive", f"file={image.name},if=none,id=d0,format=raw,cache=writeback",
                                    "-device", "virtio-blk-device,drive=d0", "-append", f"{LKVM_DEFAULTS} {params}"],
        "QEMU qcow2": qemu_base() + ["-drive", f"file={qcow2},if=none,id=d0,format=qcow2,cache=writeback",
                                     "-device", "virtio-blk-device,drive=d0", "-append", f"{LKVM_DEFAULTS} {params}"],
    }
    table = {name: {t: [] for t in TESTS} for name in vmms}
    for i in range(args.runs):
        for name, cmd in vmms.items():
            r = results(run(cmd)["lines"])
            for t in TESTS:
                table[name][t].append(parse(r.get(f"blkbench:{t}")))
            print(f"run {i + 1} {name}: " + ", ".join(f"{t}={r.get('blkbench:' + t)}" for t in TESTS), file=sys.stderr)
    os.unlink(image.name)
    os.unlink(qcow2)

    print(f"\nDisk benchmark: {args.runs} runs each, O_DIRECT in guest user space over {args.mib} MiB, MB/s medians")
    ratio_table([(t, {name: med(table[name][t]) for name in vmms}) for t in TESTS], list(vmms), "QEMU mmio")

    print("\nHost-side block device model (no guest):")
    subprocess.run(["cargo", "run", "--quiet", "--release", "--example", "blk_model"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()

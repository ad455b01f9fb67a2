#!/usr/bin/env python3
"""Host directory benchmark: guest user space reads a file from a shared directory (1 MiB
reads), creates, stats and deletes small files in it, and walks a tree of it as `git status`
does (read every directory, lstat every entry). lkvm's virtio-fs and 9p against QEMU's 9p
(`-fsdev local`) and QEMU's virtio-fs (vhost-user-fs with Debian's virtiofsd), same kernel,
initramfs, directory and guest work, side by side, as ratios.

Usage: bench/shares.py [--runs N] [--mib M] [--files F] [--tree DIRSxFILES]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, MEM_MIB, med, qemu_base, ratio_table, results, run

TESTS = [("read", "MB/s"), ("meta", "ops/s"), ("walk", "entries/s")]
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def parse(value, unit):
    """'12.34MB/s,...' -> 12.34"""
    if value is None or value.startswith("err"):
        return None
    return float(value.split(unit)[0])


def make_share(mib, dirs, files):
    share = tempfile.mkdtemp(prefix="lkvm-sharebench-", dir="/var/tmp")
    with open(f"{share}/big", "wb") as f:
        f.write(bytes(range(256)) * (mib << 12))
    for d in range(dirs):
        os.makedirs(f"{share}/tree/d{d}")
        for i in range(files):
            with open(f"{share}/tree/d{d}/f{i}.c", "w") as f:
                f.write("int x;\n")
    return share


def qemu_virtiofs(share, params):
    """QEMU with virtiofsd: guest RAM must be shared memory for the daemon to reach it."""
    sock = f"{share}.vfsd.sock"
    daemon = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=auto"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    base = qemu_base()
    base[base.index("-M") + 1] += ",memory-backend=mem"
    cmd = base + ["-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on",
                  "-chardev", f"socket,id=vfs,path={sock}", "-device", "vhost-user-fs-device,chardev=vfs,tag=bench",
                  "-append", f"{LKVM_DEFAULTS} {params}"]
    try:
        return run(cmd)
    finally:
        daemon.kill()
        daemon.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--tree", default="20x100", help="directories x files in each, for the walk")
    args = ap.parse_args()
    dirs, per_dir = (int(n) for n in args.tree.split("x"))
    share = make_share(args.mib, dirs, per_dir)
    p9 = f"{HOST_PARAMS} lkvm.p9bench=bench:{args.files}"
    vfs = f"{HOST_PARAMS} lkvm.fsbench=bench:{args.files}"
    base = [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", str(MEM_MIB), "-c", "1",
            "-n", "mode=none"]
    vmms = {
        "lkvm virtio-fs": ("fsbench", lambda: run(base + ["--fs", f"{share},bench", "-p", vfs])),
        "lkvm 9p": ("p9bench", lambda: run(base + ["--9p", f"{share},bench", "-p", p9])),
        "QEMU 9p": ("p9bench", lambda: run(qemu_base() + [
            "-fsdev", f"local,id=fs0,path={share},security_model=passthrough",
            "-device", "virtio-9p-device,fsdev=fs0,mount_tag=bench", "-append", f"{LKVM_DEFAULTS} {p9}"])),
    }
    if os.path.exists(VIRTIOFSD):
        vmms["QEMU virtio-fs"] = ("fsbench", lambda: qemu_virtiofs(share, vfs))
    table = {name: {t: [] for t, _ in TESTS} for name in vmms}
    for i in range(args.runs):
        for name, (prefix, boot) in vmms.items():
            r = results(boot()["lines"])
            for t, unit in TESTS:
                table[name][t].append(parse(r.get(f"{prefix}:{t}"), unit))
            print(f"run {i + 1} {name}: " + ", ".join(f"{t}={r.get(prefix + ':' + t)}" for t, _ in TESTS),
                  file=sys.stderr)
    shutil.rmtree(share)

    print(f"\nShared directory benchmark: {args.runs} runs each; read of a {args.mib} MiB file, "
          f"create+stat+unlink of {args.files} files, walk of {dirs}x{per_dir} files; medians")
    ratio_table([(f"{t} ({unit})", {name: med(table[name][t]) for name in vmms}) for t, unit in TESTS],
                list(vmms), "lkvm 9p")


if __name__ == "__main__":
    main()

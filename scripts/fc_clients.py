"""Drives lkvm, as `firecracker`, with the API classes of two Firecracker clients from PyPI
(firecracker-python, pyrecracker): boot the test guest, pause, snapshot, resume, then load the
snapshot in a fresh process and see the guest carry on. Run by scripts/fc-clients.sh."""
import os, subprocess, sys, time, threading
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LKVM = f"{ROOT}/target/x86_64-unknown-linux-gnu/release/lkvm"
K = f"{ROOT}/guest/out/vmlinux"; I = f"{ROOT}/guest/out/initramfs.cpio"
PARAMS = "noxsave clearcpuid=popcnt,fsgsbase,smap,rdrand,rdseed,rdpid,invpcid,pcid,cx16 clocksource=kvm-clock quiet"
work = os.path.join(ROOT, "target", "fc-clients"); os.makedirs(work, exist_ok=True)
fc = f"{work}/firecracker"
if not os.path.exists(fc): os.symlink(LKVM, fc)

def start(sock, log):
    if os.path.exists(sock): os.remove(sock)
    p = subprocess.Popen([fc, "--api-sock", sock, "--id", "abcd1234", "--log-path", log],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: [lines.append(l.rstrip()) for l in p.stdout], daemon=True).start()
    for _ in range(100):
        if os.path.exists(sock): break
        time.sleep(0.05)
    return p, lines

def wait_line(lines, text, timeout=900):
    end = time.time() + timeout
    while time.time() < end:
        if any(text in l for l in lines): return True
        time.sleep(0.5)
    return False

which = sys.argv[1]
sock, log = f"{work}/{which}.sock", f"{work}/{which}.log"
open(log, "w").close()
p, lines = start(sock, log)
boot_args = f"console=ttyS0 reboot=k panic=1 pci=off {PARAMS} lkvm.snapwork=600"
snap, mem = f"{work}/{which}.snap", f"{work}/{which}.mem"
if which == "firecracker-python":
    from firecracker.api import Api
    a = Api(sock)
    print("GET /", a.describe.get().json())
    a.boot.put(kernel_image_path=K, initrd_path=I, boot_args=boot_args)
    a.machine_config.put(vcpu_count=1, mem_size_mib=128)
    a.actions.put(action_type="InstanceStart")
    print("started; waiting for the guest")
    assert wait_line(lines, "snap_ready"), "\n".join(lines[-20:])
    print("the guest is up")
    a.vm.patch(state="Paused"); assert a.describe.get().json()["state"] == "Paused"
    a.create_snapshot.put(mem_file_path=mem, snapshot_path=snap)
    a.vm.patch(state="Resumed"); assert a.describe.get().json()["state"] == "Running"
else:
    from pyrecracker.client import FirecrackerClient
    from pyrecracker.client_types import MachineConfiguration, BootSource, InstanceActionInfo, ActionType, VM, VMState, SnapshotCreateParams, SnapshotType
    c = FirecrackerClient(sock)
    c.put_machine_config(MachineConfiguration(vcpu_count=1, mem_size_mib=128))
    c.put_boot_source(BootSource(kernel_image_path=K, boot_args=boot_args, initrd_path=I))
    c.put_actions(InstanceActionInfo(ActionType.INSTANCE_START))
    assert wait_line(lines, "snap_ready"), "\n".join(lines[-20:])
    print("the guest is up")
    c.patch_vm(VM(VMState.PAUSED)); c.put_snapshot_create(SnapshotCreateParams(snap, mem, SnapshotType.FULL)); c.patch_vm(VM(VMState.RESUMED))
    print("snapshot written:", os.path.getsize(snap), os.path.getsize(mem))
p.terminate(); p.wait()
# Load in a fresh process.
p2, lines2 = start(sock, log)
if which == "firecracker-python":
    a = Api(sock)
    a.load_snapshot.put(enable_diff_snapshots=True, mem_backend={"backend_type": "File", "backend_path": mem}, snapshot_path=snap, resume_vm=True)
    assert a.describe.get().json()["state"] == "Running"
else:
    from pyrecracker.client_types import SnapshotLoadParams
    c.put_snapshot_load(SnapshotLoadParams(snapshot_path=snap, mem_file_path=mem, resume_vm=True))
    print("loaded")
assert wait_line(lines2, "LKVM-WORK", 60), "the restored guest is silent:\n" + "\n".join(lines2[-20:])
print("the restored guest carries on")
p2.terminate(); p2.wait()
print("\n".join(lines2[-5:]))

/* The floor for bench/start.py: the least a process can do to run the flat payload under KVM.
 *
 * It makes what lkvm and kvmtool both make for the payload (a VM with the in-kernel irqchip
 * and PIT, guest RAM, one vCPU with the host's supported CPUID, real mode at 0x1000:0000 as
 * kvmtool loads flat binaries) and nothing of a VMM's own: no devices, threads, files, filters
 * or options. COM1 writes go to stdout; a write of 0xfe to the i8042 (reset) ends it.
 * A VMM's own share of start-up is what it takes beyond this.
 *
 * Usage: floor PAYLOAD MIB
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define LOAD_SEGMENT 0x1000
#define MAX_CPUID_ENTRIES 256

static int check(int ret, const char *what) {
    if (ret < 0) {
        perror(what);
        exit(1);
    }
    return ret;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PAYLOAD MIB\n", argv[0]);
        return 2;
    }
    size_t ram = (size_t)atoi(argv[2]) << 20;
    int kvm = check(open("/dev/kvm", O_RDWR | O_CLOEXEC), "/dev/kvm");
    int vm = check(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");
    check(ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000), "KVM_SET_TSS_ADDR");
    check(ioctl(vm, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {0};
    check(ioctl(vm, KVM_CREATE_PIT2, &pit), "KVM_CREATE_PIT2");

    unsigned char *mem = mmap(NULL, ram, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = ram, .userspace_addr = (unsigned long)mem};
    check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");
    int payload = check(open(argv[1], O_RDONLY | O_CLOEXEC), argv[1]);
    size_t base = (size_t)LOAD_SEGMENT << 4;
    check(read(payload, mem + base, ram - base), "read");
    close(payload);

    int vcpu = check(ioctl(vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU");
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + MAX_CPUID_ENTRIES * sizeof(cpuid->entries[0]));
    cpuid->nent = MAX_CPUID_ENTRIES;
    check(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid), "KVM_GET_SUPPORTED_CPUID");
    check(ioctl(vcpu, KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2");
    int run_size = check(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) {
        perror("mmap kvm_run");
        return 1;
    }

    struct kvm_sregs sregs;
    check(ioctl(vcpu, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
    struct kvm_segment *segments[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (size_t i = 0; i < sizeof(segments) / sizeof(segments[0]); i++) {
        segments[i]->selector = LOAD_SEGMENT;
        segments[i]->base = base;
    }
    check(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0, .rsp = 0xfff0, .rflags = 2};
    check(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");

    for (;;) {
        check(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "floor: exit reason %u\n", run->exit_reason);
            return 1;
        }
        unsigned char *data = (unsigned char *)run + run->io.data_offset;
        if (run->io.direction != KVM_EXIT_IO_OUT)
            memset(data, 0xff, (size_t)run->io.size * run->io.count);
        else if (run->io.port == 0x3f8)
            (void)!write(1, data, (size_t)run->io.size * run->io.count);
        else if (run->io.port == 0x64 && data[0] == 0xfe)
            return 0;
    }
}

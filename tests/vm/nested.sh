#!/bin/bash
# Runs a command on a nested KVM: boots an L1 Linux under QEMU TCG with -cpu max (which
# emulates AMD SVM), loads kvm-amd there, shares the host's / over virtio-9p, and runs the
# command chrooted into it from the current directory. A 1 GiB ext4 RAM disk is mounted
# at $RQEMU_SCRATCH (O_DIRECT works there; 9p and tmpfs lack it).
# Output is the command's; the status is the command's.
# usage: nested.sh [-t TIMEOUT_S] COMMAND...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
timeout_s=1800
if [ "${1:-}" = "-t" ]; then timeout_s=$2; shift 2; fi
kernel=$(vm_kernel) || { echo "nested.sh: no kernel in /boot" >&2; exit 2; }
ver=$(vm_kernel_version)
root=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$root" "$work"' EXIT
add_busybox "$root"
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p irqbypass ccp kvm kvm-amd crc16 mbcache jbd2 crc32c_generic libcrc32c ext4 brd"
add_modules "$root" "$ver" $mods
scratch=/tmp/rqemu-l1-scratch
mkdir -p "$scratch"
{
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'export RQEMU_SCRATCH=%q RQEMU_NESTED=1 HOME=%q\n' "$scratch" "${HOME:-/root}"
    printf '%q ' "$@"
    echo
} > "$root/run.sh"
cat > "$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in $mods; do
    case \$m in brd) insmod /lib/modules/brd.ko rd_nr=1 rd_size=1048576 ;; *) insmod /lib/modules/\$m.ko ;; esac
done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none host /host
mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t devpts devpts /host/dev/pts
[ -e /host/dev/fd ] || ln -s /proc/self/fd /host/dev/fd
[ -e /host/dev/stdin ] || ln -s /proc/self/fd/0 /host/dev/stdin
[ -e /host/dev/stdout ] || ln -s /proc/self/fd/1 /host/dev/stdout
[ -e /host/dev/stderr ] || ln -s /proc/self/fd/2 /host/dev/stderr
mke2fs -q /dev/ram0 >/dev/null 2>&1 && mount -t ext4 /dev/ram0 /host$scratch
echo "RQEMU-L1-START"
chroot /host /bin/bash /proc/1/root/run.sh </dev/null
echo "RQEMU-L1-EXIT \$?"
poweroff -f
INIT
chmod +x "$root/init"
mk_initramfs "$root" "$work/l1.cpio.gz"
set +e
timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 3072 -smp 2 \
    -kernel "$kernel" -initrd "$work/l1.cpio.gz" \
    -append 'console=ttyS0 quiet loglevel=1 panic=-1' \
    -virtfs local,path=/,mount_tag=host,security_model=passthrough,multidevs=remap \
    -nographic -no-reboot -nic none </dev/null > "$work/out" 2>&1
qrc=$?
set -e
sed -e '1,/RQEMU-L1-START/d' -e '/RQEMU-L1-EXIT/,$d' -e 's/\r$//' "$work/out"
rc=$(sed -n 's/^RQEMU-L1-EXIT \([0-9]*\).*/\1/p' "$work/out" | tr -d '\r' | tail -n 1)
if [ -z "$rc" ]; then
    echo "nested.sh: L1 ended without a status (qemu exit $qrc); its console:" >&2
    tail -n 40 "$work/out" >&2
    exit 3
fi
exit "$rc"

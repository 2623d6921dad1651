#!/bin/bash
# Builds the L2 test guest's initramfs: busybox, the virtio block modules of the guest
# kernel, and the scenario scripts of tests/vm/guest. The kernel command line's
# rqemu.test=NAME picks the scenario.
# usage: build-guest.sh OUT.cpio.gz [EXTRA_DIR]   (EXTRA_DIR is copied into the root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
out=$1
ver=$(vm_kernel_version)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
add_busybox "$root"
add_modules "$root" "$ver" virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
mkdir -p "$root/tests"
cp "$here"/guest/*.sh "$root/tests/"
if [ $# -ge 2 ] && [ -d "$2" ]; then
    cp -a "$2"/. "$root"/
fi
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
done
echo "RQ: init"
t=$(sed -n 's/.*rqemu\.test=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -f "/tests/$t.sh" ]; then
    . "/tests/$t.sh"
else
    echo "RQ: no scenario '$t'"
fi
echo "RQ: done"
poweroff -f
INIT
chmod +x "$root/init"
mk_initramfs "$root" "$out"

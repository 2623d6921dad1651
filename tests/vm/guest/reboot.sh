# First boot: marks the disk and reboots. Second boot: sees the mark and powers off.
. /tests/common.sh
wait_dev vda
m=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 5)
if [ "$m" = "BOOT1" ]; then
    echo "RQ: second-boot"
    poweroff -f
fi
# The boot protocol: 0xb0 (Linux's PVH entry names QEMU as the loader outside Xen)
# after PVH, 0xff (our own loader id) after the 64-bit protocol.
echo "RQ: loader=$(od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')"
echo "RQ: first-boot"
printf 'BOOT1' | dd of=/dev/vda conv=fsync 2>/dev/null
reboot -f

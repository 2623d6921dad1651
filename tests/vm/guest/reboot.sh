# First boot: marks the disk and reboots. Second boot: sees the mark and powers off.
. /tests/common.sh
wait_dev vda
m=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 5)
if [ "$m" = "BOOT1" ]; then
    echo "RQ: second-boot"
    poweroff -f
fi
echo "RQ: first-boot"
printf 'BOOT1' | dd of=/dev/vda conv=fsync 2>/dev/null
reboot -f

# Machine facts, then a pattern written and read back, then a discard.
. /tests/common.sh
echo "RQ: cpus=$(cat /sys/devices/system/cpu/online)"
echo "RQ: memkb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "RQ: uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"
wait_dev vda
[ -b /dev/vda ] && echo "RQ: vda=present"
echo "RQ: serial=$(cat /sys/block/vda/serial 2>/dev/null)"
echo "RQ: sectors=$(cat /sys/block/vda/size)"
pattern /tmp/p '\245'
write_read vda /tmp/p 1
write_read vda /tmp/p 4
blkdiscard -o 4194304 -l 1048576 /dev/vda && echo "RQ: discard=ok"
sync

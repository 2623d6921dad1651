# Machine facts, then a pattern written and read back, then a discard.
. /tests/common.sh
echo "RQ: cpus=$(cat /sys/devices/system/cpu/online)"
echo "RQ: memkb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "RQ: uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"
# KASLR: the zero page's loadflags (KASLR_FLAG is bit 1) and where the kernel text is.
echo "RQ: loadflags=$(od -An -tx1 -j 529 -N 1 /sys/kernel/boot_params/data | tr -d ' ')"
echo "RQ: text=$(sed -n 's/^\([0-9a-f]*\) T _text$/\1/p' /proc/kallsyms)"
wait_dev vda
[ -b /dev/vda ] && echo "RQ: vda=present"
echo "RQ: serial=$(cat /sys/block/vda/serial 2>/dev/null)"
echo "RQ: sectors=$(cat /sys/block/vda/size)"
pattern /tmp/p '\245'
write_read vda /tmp/p 1
write_read vda /tmp/p 4
blkdiscard -o 4194304 -l 1048576 /dev/vda && echo "RQ: discard=ok"
sync

# Helpers for the guest scenarios (sourced by /init before the scenario).
wait_dev() {
    i=0
    while [ ! -b "/dev/$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}
# pattern FILE BYTE_OCTAL: 1 MiB of one byte.
pattern() {
    dd if=/dev/zero bs=1048576 count=1 2>/dev/null | tr '\000' "$2" > "$1"
}
# write_read DEV FILE MIB_OFFSET: writes FILE at the offset, drops caches, compares.
write_read() {
    dd if="$2" of="/dev/$1" bs=1048576 seek="$3" conv=fsync 2>/dev/null || { echo "RQ: $1 write=failed"; return 1; }
    echo 3 > /proc/sys/vm/drop_caches
    a=$(md5sum < "$2")
    b=$(dd if="/dev/$1" bs=1048576 skip="$3" count=1 2>/dev/null | md5sum)
    if [ "$a" = "$b" ]; then echo "RQ: $1 rw=ok"; else echo "RQ: $1 rw=mismatch"; fi
}

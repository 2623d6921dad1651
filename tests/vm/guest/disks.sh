# Every disk: read-only ones must refuse writes; the others get a pattern of their own
# letter (vda: 'a' = 0x61, ...) written and read back.
. /tests/common.sh
wait_dev vda
sleep 0.5
for d in /sys/block/vd*; do
    n=${d##*/}
    l=${n#vd}
    echo "RQ: $n serial=$(cat $d/serial 2>/dev/null) wc=$(cat $d/queue/write_cache | tr ' ' _) queues=$(ls $d/mq | wc -l) ro=$(cat $d/ro)"
    case $(cat $d/serial 2>/dev/null) in
        NBD*)
            pattern /tmp/n N
            a=$(md5sum < /tmp/n)
            b=$(dd if=/dev/$n bs=1048576 skip=4 count=1 2>/dev/null | md5sum)
            if [ "$a" = "$b" ]; then echo "RQ: $n nbd-read=ok"; else echo "RQ: $n nbd-read=mismatch"; fi
            ;;
    esac
    if [ "$(cat $d/ro)" = 1 ]; then
        if dd if=/dev/zero of=/dev/$n bs=4096 count=1 conv=fsync 2>/dev/null; then
            echo "RQ: $n ro-write=accepted"
        else
            echo "RQ: $n ro-write=refused"
        fi
        continue
    fi
    pattern /tmp/p "$l"
    write_read $n /tmp/p 1
done

#!/usr/bin/env bash
# copy-floor.sh - what moving the data alone costs on this machine, next to qemu-img
# convert of the same data: the floor under bench/img-ops.sh's uncompressed rows.
#
#   bench/copy-floor.sh                  # 2 GiB source (1 GiB of data), 5 runs
#   RUNS=7 SIZE_MB=1024 bench/copy-floor.sh
#
# The source is laid out as in img-ops.sh: random data in every other 64 MiB, holes
# between. Timed, interleaved, median of RUNS: qemu-img convert raw -> qcow2 of the
# whole source, and copies of its data alone (SIZE_MB/2 MiB, packed into one file first)
# to a new tmpfs file by bench/copy-floor.c with 1 and 2 threads, as pread/pwrite pairs,
# as memcpy between two mappings, as pread into a mapping, as copy_file_range, and as
# pread/pwrite into a target allocated whole by fallocate first; and reads of that data
# alone. A convert at 1.5x qemu-img's throughput would have to finish in 1/1.5 of
# qemu-img's time, data copy included. Scratch files live on /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-2048}
W=$(mktemp -d /dev/shm/rqfloor.XXXXXX)
trap 'rm -rf "$W"' EXIT
cc -O2 -pthread -o "$W/copy-floor" bench/copy-floor.c
src="$W/src.raw"
truncate -s "${SIZE_MB}M" "$src"
for ((mb = 0; mb < SIZE_MB; mb += 128)); do
    dd if=/dev/urandom of="$src" bs=1M count=64 seek=$mb conv=notrunc status=none
done
data_mb=$((SIZE_MB / 2))
head -c "${data_mb}M" /dev/urandom > "$W/data"

now() { date +%s.%N; }
declare -A T
cases="convert rw1 rw2 mmap1 mmap2 fill1 fill2 cfr1 cfr2 falloc1 falloc2 read1 read2"
for i in $(seq "$RUNS"); do
    for c in $cases; do
        rm -f "$W/out"
        # Start from freshly freed memory, as bench/img-ops.sh does (see there).
        head -c 2G /dev/zero > "$W/warm"
        rm -f "$W/warm"
        case $c in
            convert)
                t0=$(now); qemu-img convert -O qcow2 "$src" "$W/out"; t=$(echo "$(now) - $t0" | bc) ;;
            *)
                t=$("$W/copy-floor" "$W/data" "$W/out" $((data_mb << 20)) "${c: -1}" "${c%?}") ;;
        esac
        T[$c]+="$t "
    done
done
rm -f "$W/out"
med() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
q=$(echo "${T[convert]}" | med)
printf '%-52s %8.3f s\n' "qemu-img convert -O qcow2, ${SIZE_MB} MiB (half data)" "$q"
printf '%-52s %8.3f s\n' "  1.5x its throughput would take" "$(echo "$q / 1.5" | bc -l)"
for c in rw1 rw2 mmap1 mmap2 fill1 fill2 cfr1 cfr2 falloc1 falloc2 read1 read2; do
    what="copy ${data_mb} MiB: ${c%?}"
    [ "${c%?}" = read ] && what="read ${data_mb} MiB"
    printf '%-52s %8.3f s\n' "$what, ${c: -1} thread(s)" "$(echo "${T[$c]}" | med)"
done

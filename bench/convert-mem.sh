#!/usr/bin/env bash
# convert-mem.sh - peak memory, page faults and time of rqemu-img convert against
# qemu-img convert, from a source in memory (tmpfs: every read completes at once from
# the page cache) and from a source on disk (page cache dropped before each run).
#
#   bench/convert-mem.sh                      # 5 runs per row, all four rows
#   RUNS=7 ROWS="shm_to_qcow2" bench/convert-mem.sh
#   DISK_DIR=/work/scratch DISK_MB=3072 bench/convert-mem.sh
#
# Rows:
#   shm_to_qcow2  1 GiB raw image, half data (512 MiB written in scattered 1-4 MiB
#                 extents), on /dev/shm -> qcow2 on /dev/shm
#   shm_to_raw    the same data as qcow2 on /dev/shm -> raw on /dev/shm
#   disk_to_qcow2 3 GiB raw image, all data, on disk (DISK_DIR, not tmpfs) -> qcow2 on
#                 disk, after `sync` and `echo 3 > /proc/sys/vm/drop_caches`
#   disk_to_raw   the same data as qcow2 on disk -> raw on disk, caches dropped likewise
#
# Peak RSS and page faults (minor + major) come from `/usr/bin/time -f '%M %R %F'` of
# the tool itself; time is wall-clock around it. Both tools run interleaved on the same
# inputs; figures are medians of RUNS runs; ratios are rqemu-img over qemu-img (below 1
# is better for rqemu-img), of the medians and of the smallest figures (`fastest`: the
# noise here only ever slows a run down). One extra qemu-img run per row, against the
# qemu-img median, shows the noise floor. As in img-ops.sh, each timed run starts right after
# 2 GiB was written to a tmpfs file and freed (memory freed a few seconds before it is
# touched again faults in slowly on these machines). The disk rows need root (to drop
# the page cache) and about 4 x DISK_MB of free space in DISK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SHM_MB=${SHM_MB:-1024}
DATA_MB=${DATA_MB:-512}
DISK_MB=${DISK_MB:-3072}
DISK_DIR=${DISK_DIR:-/var/tmp}
ROWS=${ROWS:-shm_to_qcow2 shm_to_raw disk_to_qcow2 disk_to_raw}
cargo build --release -q --bin rqemu-img
RQIMG=$PWD/target/release/rqemu-img
W=$(mktemp -d /dev/shm/rqmem.XXXXXX)
D=$(mktemp -d "$DISK_DIR/rqmem.XXXXXX")
trap 'rm -rf "$W" "$D"' EXIT

case " $ROWS " in
*" shm_"*)
    # DATA_MB of random data in extents of 1-4 MiB at scattered places (gaps of
    # 1-4 MiB scaled to the share of holes), the rest holes.
    python3 - "$W/src.raw" "$SHM_MB" "$DATA_MB" <<'PY'
import os, random, sys
path, size_mb, data_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MiB = 1 << 20
rng = random.Random(42)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size_mb * MiB)
pos = written = 0
holes = size_mb - data_mb
while written < data_mb * MiB and pos < size_mb * MiB:
    n = min(rng.randint(1, 4) * MiB, data_mb * MiB - written, size_mb * MiB - pos)
    os.pwrite(fd, os.urandom(n), pos)
    written += n
    pos += n + rng.randint(1, 4) * MiB * holes // max(data_mb, 1)
os.close(fd)
PY
    qemu-img convert -O qcow2 "$W/src.raw" "$W/src.qcow2"
    ;;
esac
case " $ROWS " in
*" disk_"*)
    head -c "${DISK_MB}M" /dev/urandom > "$D/src.raw"
    qemu-img convert -O qcow2 "$D/src.raw" "$D/src.qcow2"
    ;;
esac

now() { date +%s.%N; }
# prepare ROW: remove the last output, leave freshly freed memory, drop the page cache
# for the disk rows (not timed)
prepare() {
    rm -f "$W/out" "$D/out"
    case $1 in
        disk_*) sync ;;
    esac
    head -c 2G /dev/zero > "$W/warm"
    rm -f "$W/warm"
    case $1 in
        disk_*) echo 3 > /proc/sys/vm/drop_caches ;;
    esac
}
# run_one TOOL ROW -> "seconds peak_rss_kib faults"
run_one() {
    local tool=$1 row=$2 t0 t1
    prepare "$row"
    t0=$(now)
    case $row in
        shm_to_qcow2) /usr/bin/time -o "$W/time" -f '%M %R %F' "$tool" convert -O qcow2 "$W/src.raw" "$W/out" ;;
        shm_to_raw) /usr/bin/time -o "$W/time" -f '%M %R %F' "$tool" convert -O raw "$W/src.qcow2" "$W/out" ;;
        disk_to_qcow2) /usr/bin/time -o "$W/time" -f '%M %R %F' "$tool" convert -O qcow2 "$D/src.raw" "$D/out" ;;
        disk_to_raw) /usr/bin/time -o "$W/time" -f '%M %R %F' "$tool" convert -O raw "$D/src.qcow2" "$D/out" ;;
    esac
    t1=$(now)
    read -r rss minflt majflt < "$W/time"
    echo "$(echo "$t1 - $t0" | bc),$rss,$((minflt + majflt))"
}

declare -A T
for row in $ROWS; do
    for i in $(seq "$RUNS"); do
        T[$row,qemu]+="$(run_one qemu-img "$row") "
        T[$row,rqemu]+="$(run_one "$RQIMG" "$row") "
    done
    T[$row,qemu2]="$(run_one qemu-img "$row")"
done

python3 - <<PY
import statistics
T = {
$(for k in "${!T[@]}"; do echo "    '$k': [tuple(float(v) for v in x.split(',')) for x in '${T[$k]}'.split()],"; done)
}
def med(k, i): return statistics.median(r[i] for r in T[k])
print(f"{'row':<30}{'':>6}{'qemu-img':>12}{'rqemu-img':>12}{'ratio':>8}{'qemu vs qemu':>14}{'fastest':>9}")
for row, label in [
    ("shm_to_qcow2", "raw -> qcow2, tmpfs"),
    ("shm_to_raw", "qcow2 -> raw, tmpfs"),
    ("disk_to_qcow2", "raw -> qcow2, disk"),
    ("disk_to_raw", "qcow2 -> raw, disk"),
]:
    if f"{row},qemu" not in T:
        continue
    for i, what, unit, scale in [(0, "time", "s", 1), (1, "RSS", "MiB", 1 / 1024), (2, "faults", "", 1)]:
        q, r = med(f"{row},qemu", i), med(f"{row},rqemu", i)
        noise = T[f"{row},qemu2"][0][i] / q
        fmt = (lambda v: f"{v * scale:.3f} {unit}") if i == 0 else (lambda v: f"{v * scale:.1f} {unit}".strip()) if i == 1 else (lambda v: f"{v:.0f}")
        fastest = min(x[i] for x in T[f"{row},rqemu"]) / min(x[i] for x in T[f"{row},qemu"])
        print(f"{label if i == 0 else '':<30}{what:>6}{fmt(q):>12}{fmt(r):>12}{r / q:>7.2f}x{noise:>13.2f}x{fastest:>8.2f}x")
PY

#!/usr/bin/env bash
# img-ops.sh - rqemu-img against qemu-img on the image operations that move data:
# convert raw->qcow2, qcow2->raw, raw->qcow2 -c, commit of a full overlay, safe rebase.
# Both tools run side by side on the same inputs, interleaved, median of RUNS runs.
#
#   bench/img-ops.sh                  # 2 GiB image, 5 runs
#   RUNS=7 SIZE_MB=1024 bench/img-ops.sh
#
# The source image is half random data, half zeroes (holes). Throughput is the image's
# virtual size over the run time; the ratio is rqemu's throughput over QEMU's (higher is
# better for rqemu), of the medians and of the fastest runs (the noise here only ever
# slows a run down). One extra QEMU run per row, against the QEMU median, shows the noise
# floor. Scratch files live on /dev/shm. ROWS picks rows (default: all five).
#
# Memory freed a few seconds before it is touched again faults in slowly on these
# machines (the host takes back free pages reported by the guest), and every run here
# fills hundreds of MiB of new tmpfs pages: so each timed run starts right after 2 GiB
# was written to a scratch file and freed, which leaves both tools the same freshly
# freed memory to allocate from (without it, commit's QEMU-against-QEMU figure ranged
# over 0.6-1.7 s).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-2048}
cargo build --release -q
RQIMG=$PWD/target/release/rqemu-img
W=$(mktemp -d /dev/shm/rqbench.XXXXXX)
trap 'rm -rf "$W"' EXIT

half=$((SIZE_MB / 2))
src="$W/src.raw"
# Random data in the first half (in 64 MiB runs every other 64 MiB, so zero runs sit
# between data runs), holes elsewhere.
truncate -s "${SIZE_MB}M" "$src"
for ((mb = 0; mb < SIZE_MB; mb += 128)); do
    dd if=/dev/urandom of="$src" bs=1M count=64 seek=$mb conv=notrunc status=none
done
qemu-img convert -O qcow2 "$src" "$W/src.qcow2"
# commit: an empty base under an overlay holding all of the source.
qemu-img create -q -f qcow2 "$W/base0.qcow2" "${SIZE_MB}M"
qemu-img convert -O qcow2 -B "$W/base0.qcow2" -F qcow2 "$src" "$W/over0.qcow2"
# rebase: an overlay with a little data over the source, moved onto a base that differs
# from the source in every other 64 MiB data run.
cp "$W/src.qcow2" "$W/newbase.qcow2"
for ((mb = 0; mb < SIZE_MB; mb += 256)); do
    qemu-io -c "write -q -P 0x5a ${mb}M 64M" "$W/newbase.qcow2" >/dev/null
done
qemu-img create -q -f qcow2 -b "$W/src.qcow2" -F qcow2 "$W/rb0.qcow2"
qemu-io -c "write -q -P 1 0 1M" "$W/rb0.qcow2" >/dev/null

now() { date +%s.%N; }
# prepare ROW: fresh inputs for one run (not timed)
prepare() {
    rm -f "$W/out"
    case $1 in
        commit) cp "$W/base0.qcow2" "$W/base.qcow2"; cp "$W/over0.qcow2" "$W/over.qcow2"
                qemu-img rebase -q -u -b "$W/base.qcow2" -F qcow2 "$W/over.qcow2" ;;
        rebase) cp "$W/rb0.qcow2" "$W/rb.qcow2" ;;
    esac
    head -c 2G /dev/zero > "$W/warm"
    rm -f "$W/warm"
}
# run_one TOOL ROW -> seconds
run_one() {
    local tool=$1 row=$2 t0 t1
    prepare "$row"
    t0=$(now)
    case $row in
        to_qcow2) "$tool" convert -O qcow2 "$src" "$W/out" ;;
        to_raw) "$tool" convert -O raw "$W/src.qcow2" "$W/out" ;;
        compressed) "$tool" convert -c -O qcow2 "$src" "$W/out" ;;
        commit) "$tool" commit -q "$W/over.qcow2" ;;
        rebase) "$tool" rebase -b "$W/newbase.qcow2" -F qcow2 "$W/rb.qcow2" ;;
    esac
    t1=$(now)
    echo "$t1 - $t0" | bc
}

ROWS=${ROWS:-to_qcow2 to_raw compressed commit rebase}
declare -A T
for row in $ROWS; do
    for i in $(seq "$RUNS"); do
        T[$row,qemu]+="$(run_one qemu-img "$row") "
        T[$row,rqemu]+="$(run_one "$RQIMG" "$row") "
    done
    T[$row,qemu2]="$(run_one qemu-img "$row")"
done

python3 - "$SIZE_MB" <<PY
import statistics, sys
size_mb = int(sys.argv[1])
T = {
$(for k in "${!T[@]}"; do echo "    '$k': [float(x) for x in '${T[$k]}'.split()],"; done)
}
def med(k): return statistics.median(T[k])
print(f"{'row':<34}{'qemu-img':>14}{'rqemu-img':>14}{'ratio':>8}{'fastest':>9}")
for row, label in [
    ("to_qcow2", "convert raw -> qcow2"),
    ("to_raw", "convert qcow2 -> raw"),
    ("compressed", "convert raw -> qcow2 -c"),
    ("commit", "commit of a full overlay"),
    ("rebase", "safe rebase"),
]:
    if f"{row},qemu" not in T:
        continue
    q, r = size_mb / med(f"{row},qemu"), size_mb / med(f"{row},rqemu")
    noise = (size_mb / T[f"{row},qemu2"][0]) / q
    fastest = min(T[f"{row},qemu"]) / min(T[f"{row},rqemu"])
    print(f"{label:<34}{q:>8.0f} MiB/s{r:>8.0f} MiB/s{r/q:>7.2f}x{fastest:>8.2f}x   (qemu vs qemu: {noise:.2f}x)")
PY

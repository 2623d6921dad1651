#!/usr/bin/env bash
# qcow2-io.sh - rqemu-io against qemu-io, and rqemu-img check against qemu-img check,
# side by side on the same images, interleaved, median of RUNS runs.
#
#   bench/qcow2-io.sh            # builds the release binaries first
#   RUNS=7 SIZE_MB=2048 bench/qcow2-io.sh
#
# Rows: sequential 1 MiB read/write, random 4 KiB read/write (through the tools' default
# cache mode, writethrough), and `check` of a fully allocated image with 4 KiB clusters.
# Prints throughput per tool and the ratio rqemu/QEMU (higher is better for rqemu; for
# check the ratio is QEMU's time over rqemu's). Scratch files live on /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
RAND_OPS=${RAND_OPS:-20000}
cargo build --release -q
RQIO=$PWD/target/release/rqemu-io
RQIMG=$PWD/target/release/rqemu-img
W=$(mktemp -d /dev/shm/rqbench.XXXXXX)
trap 'rm -rf "$W"' EXIT

# Command scripts (fed on stdin, as a user would pipe them).
python3 - "$W" "$SIZE_MB" "$RAND_OPS" <<'PY'
import random, sys
w, size_mb, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = size_mb << 20
with open(f"{w}/seq_read", "w") as f:
    for i in range(size_mb):
        f.write(f"read -q {i << 20} 1M\n")
with open(f"{w}/seq_write", "w") as f:
    for i in range(size_mb):
        f.write(f"write -q -P {i % 250 + 1} {i << 20} 1M\n")
r = random.Random(42)
offs = [r.randrange(size >> 12) << 12 for _ in range(n)]
with open(f"{w}/rand_read", "w") as f:
    for o in offs:
        f.write(f"read -q {o} 4k\n")
with open(f"{w}/rand_write", "w") as f:
    for o in offs:
        f.write(f"write -q -P 7 {o} 4k\n")
PY

fresh() { rm -f "$1"; qemu-img create -q -f qcow2 "$1" "${SIZE_MB}M"; }
full="$W/full.qcow2"
fresh "$full"
qemu-io -c "write -q -P 3 0 ${SIZE_MB}M" "$full" >/dev/null

now() { date +%s.%N; }
# run_one TOOL WORKLOAD -> seconds
run_one() {
    local tool=$1 wl=$2 img t0 t1
    case $wl in
        *write) img="$W/w.qcow2"; fresh "$img" ;;
        *) img="$full" ;;
    esac
    t0=$(now)
    "$tool" "$img" < "$W/$wl" > /dev/null
    t1=$(now)
    echo "$t1 - $t0" | bc
}

declare -A T
for wl in seq_read seq_write rand_read rand_write; do
    for i in $(seq "$RUNS"); do
        T[$wl,qemu]+="$(run_one qemu-io $wl) "
        T[$wl,rqemu]+="$(run_one "$RQIO" $wl) "
    done
    # Noise floor: QEMU against itself once more.
    T[$wl,qemu2]="$(run_one qemu-io $wl)"
done

# check on a fully allocated 4 KiB-cluster image
raw="$W/data.raw"
head -c $((SIZE_MB << 20)) /dev/urandom > "$raw"
chk="$W/chk.qcow2"
qemu-img convert -O qcow2 -o cluster_size=4k "$raw" "$chk"
rm -f "$raw"
for i in $(seq "$RUNS"); do
    t0=$(now); qemu-img check "$chk" >/dev/null; t1=$(now); T[check,qemu]+="$(echo "$t1 - $t0" | bc) "
    t0=$(now); "$RQIMG" check "$chk" >/dev/null; t1=$(now); T[check,rqemu]+="$(echo "$t1 - $t0" | bc) "
done

python3 - "$SIZE_MB" "$RAND_OPS" <<PY
import statistics, sys
size_mb, n = int(sys.argv[1]), int(sys.argv[2])
T = {
$(for k in "${!T[@]}"; do echo "    '$k': [float(x) for x in '${T[$k]}'.split()],"; done)
}
def med(k): return statistics.median(T[k])
print(f"{'row':<28}{'qemu':>14}{'rqemu':>14}{'ratio':>8}")
for wl, label, amount, unit in [
    ("seq_read", "sequential read 1 MiB", size_mb, "MiB/s"),
    ("seq_write", "sequential write 1 MiB", size_mb, "MiB/s"),
    ("rand_read", "random read 4 KiB", n, "IOPS"),
    ("rand_write", "random write 4 KiB", n, "IOPS"),
]:
    q, r = amount / med(f"{wl},qemu"), amount / med(f"{wl},rqemu")
    noise = (amount / T[f"{wl},qemu2"][0]) / q
    print(f"{label:<28}{q:>10.0f} {unit:<3}{r:>10.0f} {unit:<3}{r/q:>7.2f}x   (qemu vs qemu: {noise:.2f}x)")
q, r = med("check,qemu"), med("check,rqemu")
print(f"{'check, ' + str(size_mb) + ' MiB 4k clusters':<28}{q:>12.3f} s{r:>12.3f} s{q/r:>7.2f}x")
PY

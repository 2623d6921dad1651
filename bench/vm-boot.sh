#!/usr/bin/env bash
# vm-boot.sh - rqemu-system-x86_64 against qemu-system-x86_64, side by side on the same
# kernel, initramfs and images, in one run: time from process start to the guest's init,
# the VMM's peak RSS, and in-guest O_DIRECT read throughput on a virtio disk (sequential
# 1 MiB and random 4 KiB, 4 threads) for raw and qcow2 images with cache=none,aio=native.
#
#   bench/vm-boot.sh          # builds rqemu, then runs on KVM, or nested (tests/vm/nested.sh)
#   RUNS=3 SECS=5 bench/vm-boot.sh
#
# Without a hardware KVM the whole comparison runs inside one nested-KVM machine (QEMU TCG
# L1): absolute times there are TCG's, only the ratios between the two VMMs mean much;
# RSS is real. Both VMMs get the same machine: q35, -cpu host, 2 vCPUs, 512 MiB, no
# default devices, serial on stdio.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
if [ "${1:-}" != --inner ]; then
    cargo build --release -q --bin rqemu-system-x86_64
    W=$(mktemp -d)
    trap 'rm -rf "$W"' EXIT
    mkdir -p "$W/extra/bin" "$W/extra/tests"
    cc -O2 -static -pthread -o "$W/extra/bin/vm-guest-io" bench/vm-guest-io.c
    cat > "$W/extra/tests/bench.sh" <<'G'
. /tests/common.sh
wait_dev vda
s=$(sed -n 's/.*rqemu\.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "RQ: seq $(/bin/vm-guest-io /dev/vda seq $s 4)"
echo "RQ: rand $(/bin/vm-guest-io /dev/vda rand $s 4)"
G
    tests/vm/build-guest.sh "$W/guest.cpio.gz" "$W/extra"
    if grep -qE '^flags.* (vmx|svm)' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ]; then
        exec bash bench/vm-boot.sh --inner "$W/guest.cpio.gz"
    fi
    tests/vm/nested.sh -t 3000 env RUNS="$RUNS" SECS="$SECS" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-}" \
        bash bench/vm-boot.sh --inner "$W/guest.cpio.gz"
    exit
fi

INITRD=$2
. tests/vm/lib.sh
KERNEL=$(vm_kernel)
RQ=${CARGO_TARGET_DIR:-$PWD/target}/release/rqemu-system-x86_64
S=${RQEMU_SCRATCH:-/var/tmp}/rqemu-bench-$$
mkdir -p "$S"
trap 'rm -rf "$S"' EXIT
qemu-img create -q -f raw "$S/d.raw" 256M
qemu-io -f raw -c 'write -P 0x5a 0 256M' "$S/d.raw" >/dev/null
qemu-img convert -O qcow2 "$S/d.raw" "$S/d.qcow2"
echo "kernel $(basename "$KERNEL"), $(nproc) CPUs$([ -n "${RQEMU_NESTED:-}" ] && echo ', nested KVM under QEMU TCG')"
echo "qemu: $(qemu-system-x86_64 --version | head -n 1)"

# run VMM FORMAT: prints "init_ms rss_kib seq_mibs rand_iops"
run() {
    local vmm=$1 fmt=$2 log=$S/log
    local t0 pid init_ms=""
    t0=$(date +%s%N)
    # A nested boot that hangs (it happens under TCG) ends after 300 s and counts as NA.
    /usr/bin/time -f '%M' -o "$S/rss" timeout -k 5 300 \
        "$vmm" -enable-kvm -M q35 -cpu host -smp 2 -m 512 -nodefaults -display none -serial stdio -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 rqemu.test=bench rqemu.secs=$SECS" \
        -drive file="$S/d.$fmt",format=$fmt,if=virtio,cache=none,aio=native </dev/null > "$log" 2>&1 &
    pid=$!
    while kill -0 $pid 2>/dev/null; do
        if [ -z "$init_ms" ] && grep -q 'RQ: init' "$log"; then
            init_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
        fi
        sleep 0.05
    done
    wait $pid || true
    local seq rand rss
    seq=$(tr -d '\r' < "$log" | sed -n 's/^RQ: seq \([0-9.]*\) .*/\1/p')
    rand=$(tr -d '\r' < "$log" | sed -n 's/^RQ: rand [0-9.]* \([0-9]*\)/\1/p')
    rss=$(tail -n 1 "$S/rss")
    echo "${init_ms:-NA} ${rss:-NA} ${seq:-NA} ${rand:-NA}"
}

median() { grep -v NA | sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "NA")}'; }

# rqemu keeps the kernels it unpacks (arch/unpack/cache.rs): the first boot of a kernel
# decompresses it, later boots read it back. That first boot is measured on its own; the
# runs below are later boots, as a user's are after the first.
export RQEMU_KERNEL_CACHE=$S/kernels
cold=$(run "$RQ" raw)
echo "rqemu, first boot of the kernel (not yet unpacked): boot to init ${cold%% *} ms, peak RSS $(awk -v x="$(echo "$cold" | cut -d' ' -f2)" 'BEGIN{printf "%.1f", x/1024}') MiB"
for fmt in raw qcow2; do
    : > "$S/rq.$fmt"; : > "$S/qemu.$fmt"
    for i in $(seq "$RUNS"); do
        run "$RQ" $fmt >> "$S/rq.$fmt"
        run qemu-system-x86_64 $fmt >> "$S/qemu.$fmt"
    done
done

col() { awk -v c="$2" '{print $c}' "$1" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || b == 0) print "NA"; else printf "%.2f", a / b }'; }
printf '\n%-34s %14s %14s %10s\n' "median of $RUNS runs" rqemu qemu rqemu/qemu
for fmt in raw qcow2; do
    for m in "1 boot to init (ms)" "2 peak RSS (MiB)" "3 seq read 1M (MiB/s)" "4 rand read 4K (IOPS)"; do
        c=${m%% *}; name=${m#* }
        a=$(col "$S/rq.$fmt" "$c"); b=$(col "$S/qemu.$fmt" "$c")
        if [ "$c" = 2 ]; then a=$(awk -v x="$a" 'BEGIN{printf "%.1f", x/1024}'); b=$(awk -v x="$b" 'BEGIN{printf "%.1f", x/1024}'); fi
        printf '%-34s %14s %14s %10s\n' "$fmt: $name" "$a" "$b" "$(ratio "$a" "$b")"
    done
done

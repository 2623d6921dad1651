#!/usr/bin/env bash
# vm-boot.sh - rqemu-system-x86_64 against qemu-system-x86_64, side by side on the same
# kernel, initramfs and images, in one run: time from process start to the guest's init,
# the VMM's peak RSS, and in-guest O_DIRECT read throughput on a virtio disk (sequential
# 1 MiB and random 4 KiB, 4 threads) for raw and qcow2 images with cache=none, once with
# aio=native and once with the default aio (threads): two read-only disks on one image.
#
#   bench/vm-boot.sh          # builds rqemu, then runs on KVM, or nested (tests/vm/nested.sh)
#   RUNS=3 SECS=5 bench/vm-boot.sh
#
# Without a hardware KVM the whole comparison runs inside a nested-KVM machine (QEMU TCG
# L1): absolute times there are TCG's, only the ratios between the two VMMs mean much;
# RSS is real. Such a machine sometimes dies or stalls under TCG: another one then carries
# on with the runs left (up to four in all). Both VMMs get the same machine: q35, -cpu host, 2 vCPUs, 512 MiB, no
# default devices, serial on stdio.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
median() { grep -v NA | sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "NA")}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || b == 0) print "NA"; else printf "%.2f", a / b }'; }
mib() { awk -v x="$1" 'BEGIN { if (x == "NA") print x; else printf "%.1f", x / 1024 }'; }
# report RESULTS: medians of lines
# "FORMAT RUN VMM init_ms rss_kib seq_mibs rand_iops seq_mibs_threads rand_iops_threads"
# (VMM "rq" or "qemu"; FORMAT "cold" for rqemu's first boot of the kernel).
report() {
    local r=$1 fmt m c a b n
    col() { awk -v f="$1" -v v="$2" -v c="$3" '$1 == f && $3 == v {print $(c + 3)}' "$r" | median; }
    a=$(awk '$1 == "cold" {print $4, $5}' "$r")
    [ -n "$a" ] && echo "rqemu, first boot of the kernel (not yet unpacked): boot to init ${a%% *} ms, peak RSS $(mib "${a#* }") MiB"
    n=$(awk '$1 != "cold"' "$r" | wc -l)
    printf '\n%-40s %14s %14s %10s\n' "median of $RUNS runs ($n boots)" rqemu qemu rqemu/qemu
    for fmt in raw qcow2; do
        for m in "1 boot to init (ms)" "2 peak RSS (MiB)" "3 seq read 1M, native (MiB/s)" \
            "4 rand read 4K, native (IOPS)" "5 seq read 1M, threads (MiB/s)" "6 rand read 4K, threads (IOPS)"; do
            c=${m%% *}
            a=$(col $fmt rq "$c"); b=$(col $fmt qemu "$c")
            if [ "$c" = 2 ]; then a=$(mib "$a"); b=$(mib "$b"); fi
            printf '%-40s %14s %14s %10s\n' "$fmt: ${m#* }" "$a" "$b" "$(ratio "$a" "$b")"
        done
    done
}

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
wait_dev vdb
echo "RQ: seq2 $(/bin/vm-guest-io /dev/vdb seq $s 4)"
echo "RQ: rand2 $(/bin/vm-guest-io /dev/vdb rand $s 4)"
G
    tests/vm/build-guest.sh "$W/guest.cpio.gz" "$W/extra"
    # Each finished run appends a line to $W/results, which the inner part skips when it
    # starts again: a nested machine that dies or stalls (both happen under TCG) only
    # costs the run in progress, and a new one carries on.
    : > "$W/results"
    if grep -qE '^flags.* (vmx|svm)' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ]; then
        bash bench/vm-boot.sh --inner "$W/guest.cpio.gz" "$W/results"
    else
        for attempt in 1 2 3 4; do
            touch "$W/results"
            setsid tests/vm/nested.sh -t 3000 env RUNS="$RUNS" SECS="$SECS" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-}" \
                bash bench/vm-boot.sh --inner "$W/guest.cpio.gz" "$W/results" &
            pid=$!
            # No new result for 8 minutes: the nested machine has stalled.
            while kill -0 $pid 2>/dev/null; do
                sleep 10
                if [ $(( $(date +%s) - $(stat -c %Y "$W/results") )) -gt 480 ]; then
                    echo "vm-boot.sh: the nested machine stalled; starting another" >&2
                    kill -- -$pid 2>/dev/null
                fi
            done
            wait $pid && break
            echo "vm-boot.sh: the nested machine ended early (attempt $attempt); carrying on in another" >&2
        done
    fi
    report "$W/results"
    exit
fi

INITRD=$2
RESULTS=$3
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

# run VMM FORMAT: prints "init_ms rss_kib seq_mibs rand_iops seq_mibs_threads rand_iops_threads"
# (vda has aio=native, vdb the default aio, threads; both read-only on the same image)
run() {
    local vmm=$1 fmt=$2 log=$S/log
    local t0 pid init_ms=""
    t0=$(date +%s%N)
    # A nested boot that hangs (it happens under TCG) ends after 300 s and counts as NA.
    /usr/bin/time -f '%M' -o "$S/rss" timeout -k 5 300 \
        "$vmm" -enable-kvm -M q35 -cpu host -smp 2 -m 512 -nodefaults -display none -serial stdio -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 rqemu.test=bench rqemu.secs=$SECS" \
        -drive file="$S/d.$fmt",format=$fmt,if=virtio,cache=none,aio=native,readonly=on \
        -drive file="$S/d.$fmt",format=$fmt,if=virtio,cache=none,readonly=on </dev/null > "$log" 2>&1 &
    pid=$!
    while kill -0 $pid 2>/dev/null; do
        if [ -z "$init_ms" ] && grep -q 'RQ: init' "$log"; then
            init_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
        fi
        sleep 0.05
    done
    wait $pid || true
    local rss seq rand seq2 rand2
    seq=$(tr -d '\r' < "$log" | sed -n 's/^RQ: seq \([0-9.]*\) .*/\1/p')
    rand=$(tr -d '\r' < "$log" | sed -n 's/^RQ: rand [0-9.]* \([0-9]*\)/\1/p')
    seq2=$(tr -d '\r' < "$log" | sed -n 's/^RQ: seq2 \([0-9.]*\) .*/\1/p')
    rand2=$(tr -d '\r' < "$log" | sed -n 's/^RQ: rand2 [0-9.]* \([0-9]*\)/\1/p')
    rss=$(tail -n 1 "$S/rss")
    echo "${init_ms:-NA} ${rss:-NA} ${seq:-NA} ${rand:-NA} ${seq2:-NA} ${rand2:-NA}"
}

# rqemu keeps the kernels it unpacks (arch/unpack/cache.rs): the first boot of a kernel
# decompresses it, later boots read it back. That first boot is measured on its own; the
# runs below are later boots, as a user's are after the first.
export RQEMU_KERNEL_CACHE=$S/kernels
done_already() { grep -q "^$1 $2 $3 " "$RESULTS"; }
# (A nested machine that carries on after another died boots once unrecorded, to have the
# kernel unpacked again.)
cold=$(run "$RQ" raw)
done_already cold 1 rq || echo "cold 1 rq $cold" >> "$RESULTS"
for fmt in raw qcow2; do
    for i in $(seq "$RUNS"); do
        done_already $fmt "$i" rq || echo "$fmt $i rq $(run "$RQ" $fmt)" >> "$RESULTS"
        done_already $fmt "$i" qemu || echo "$fmt $i qemu $(run qemu-system-x86_64 $fmt)" >> "$RESULTS"
    done
done

#!/bin/bash
# The VM test scenarios. Runs where /dev/kvm is a real KVM (the host, or the L1 of
# nested.sh): boots the test guest under VMM once or more per scenario and checks the
# guest's own output and the images afterwards with qemu-img and qemu-io.
# Prints one line per scenario: "SCENARIO NAME PASS|FAIL SECONDS DETAIL".
# usage: scenarios.sh VMM GUEST_INITRD [NAME...]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
VMM=$1
INITRD=$2
shift 2
KERNEL=$(vm_kernel)
S=${RQEMU_SCRATCH:-/var/tmp}/rqemu-vm-$$
mkdir -p "$S"
trap 'rm -rf "$S"' EXIT
# A kernel cache of the run's own: the first boot unpacks the kernel, later ones read it.
export RQEMU_KERNEL_CACHE=$S/kernels
names=${*:-basic snapshot noreboot reboot disks}
UUID=5a0c1c2e-77b4-4c1d-9a52-0123456789ab

# boot NAME LOG VMM_ARGS...: runs the guest scenario NAME; retries once if the guest never
# reached its init (a nested-virtualisation hiccup), saying so.
boot() {
    local name=$1 log=$2 attempt rc
    shift 2
    for attempt in 1 2; do
        timeout -k 5 "${RQEMU_BOOT_TIMEOUT:-300}" "$VMM" -kernel "${BOOT_KERNEL:-$KERNEL}" -initrd "$INITRD" \
            -append "console=ttyS0 quiet loglevel=1 panic=-1 rqemu.test=$name" \
            -nographic "$@" </dev/null 2>&1 | tr -d '\r' > "$log"
        rc=${PIPESTATUS[0]}
        if grep -q '^RQ: init' "$log" || [ $attempt = 2 ]; then
            return "$rc"
        fi
        echo "SCENARIO-NOTE $name: guest never reached init (status $rc), retried once"
        tail -n 5 "$log" | sed 's/^/  | /'
    done
}

fails=""
fail() { fails="$fails; $*"; }
want() { grep -qx "RQ: $2" "$1" || fail "guest did not print '$2'"; }
qio() { qemu-io "$@" >/dev/null 2>&1; }

report() {
    local name=$1 t0=$2 log=$3
    local dt=$(( $(date +%s) - t0 ))
    if [ -z "$fails" ]; then
        echo "SCENARIO $name PASS ${dt}s"
    else
        echo "SCENARIO $name FAIL ${dt}s ${fails#; }"
        sed 's/^/  | /' "$log" | tail -n 30
    fi
    fails=""
}

scenario_basic() {
    qemu-img create -q -f qcow2 "$S/base.qcow2" 64M
    qio -f qcow2 -c 'write -P 0x33 0 64M' "$S/base.qcow2"
    qemu-img create -q -f qcow2 -b "$S/base.qcow2" -F qcow2 "$S/ov.qcow2"
    boot basic "$S/basic.log" -smp 2 -m 512 -uuid $UUID -name rqtest \
        -drive file="$S/ov.qcow2",if=virtio,cache=none,aio=native,serial=RQSERIAL0,discard=unmap
    local rc=$?
    [ $rc = 0 ] || fail "VMM exit status $rc"
    want "$S/basic.log" "cpus=0-1"
    want "$S/basic.log" "uuid=$UUID"
    want "$S/basic.log" "vda=present"
    want "$S/basic.log" "serial=RQSERIAL0"
    want "$S/basic.log" "sectors=131072"
    want "$S/basic.log" "vda rw=ok"
    want "$S/basic.log" "discard=ok"
    # The bzImage was unpacked by the VMM with KASLR: the flag is set and the text sits
    # 2 MiB-aligned in the kernel's 1 GiB window.
    local flags text
    flags=$(sed -n 's/^RQ: loadflags=//p' "$S/basic.log" | tr -d '\r')
    text=$(sed -n 's/^RQ: text=//p' "$S/basic.log" | tr -d '\r')
    { [ -n "$flags" ] && [ $((0x$flags & 2)) != 0 ]; } || fail "KASLR flag not set (loadflags ${flags:-?})"
    { [[ $text =~ ^ffffffff[89ab][0-9a-f]{7}$ ]] && [ $((0x${text:8} % 0x200000)) = 0 ]; } ||
        fail "kernel text at '${text:-?}'"
    compgen -G "$RQEMU_KERNEL_CACHE/*.kernel" >/dev/null || fail "the unpacked kernel was not kept"
    local kb
    kb=$(sed -n 's/^RQ: memkb=//p' "$S/basic.log")
    { [ -n "$kb" ] && [ "$kb" -gt 400000 ] && [ "$kb" -le 524288 ]; } || fail "MemTotal ${kb:-?} kB for -m 512"
    qemu-img check -q "$S/ov.qcow2" || fail "qemu-img check ov.qcow2"
    qio -f qcow2 -c 'read -P 0xa5 1M 1M' "$S/ov.qcow2" || fail "pattern not on the host image"
    qio -f qcow2 -c 'read -P 0 4M 1M' "$S/ov.qcow2" || fail "discarded range does not read as zeroes"
    qio -f qcow2 -c 'read -P 0x33 8M 1M' "$S/ov.qcow2" || fail "backing data lost"
    qio -f qcow2 -c 'read -P 0x33 1M 1M' "$S/base.qcow2" || fail "backing file changed"
}

scenario_snapshot() {
    [ -f "$S/ov.qcow2" ] || { qemu-img create -q -f qcow2 "$S/ov.qcow2" 64M; qio -f qcow2 -c 'write -P 0xa5 1M 1M' "$S/ov.qcow2"; }
    local before after
    before=$(md5sum < "$S/ov.qcow2")
    boot snapshot "$S/snapshot.log" -snapshot -drive file="$S/ov.qcow2",if=virtio,cache=writeback
    local rc=$?
    [ $rc = 0 ] || fail "VMM exit status $rc"
    want "$S/snapshot.log" "vda rw=ok"
    after=$(md5sum < "$S/ov.qcow2")
    [ "$before" = "$after" ] || fail "image changed under -snapshot"
    qio -f qcow2 -c 'read -P 0xa5 1M 1M' "$S/ov.qcow2" || fail "image content changed"
}

# Also boots the kernel as an ELF vmlinux through PVH (taken out of the bzImage here).
scenario_noreboot() {
    qemu-img create -q -f raw "$S/r1.raw" 16M
    vm_elf_kernel "$S/vmlinux" || { fail "no ELF vmlinux with a PVH note"; return; }
    BOOT_KERNEL=$S/vmlinux boot reboot "$S/noreboot.log" -no-reboot -drive file="$S/r1.raw",format=raw,if=virtio
    local rc=$?
    rm -f "$S/vmlinux"
    [ $rc = 0 ] || fail "VMM exit status $rc"
    want "$S/noreboot.log" "first-boot"
    want "$S/noreboot.log" "loader=b0"
    grep -q '^RQ: second-boot' "$S/noreboot.log" && fail "guest booted again despite -no-reboot"
}

scenario_reboot() {
    qemu-img create -q -f raw "$S/r2.raw" 16M
    boot reboot "$S/reboot.log" -drive file="$S/r2.raw",format=raw,if=virtio
    local rc=$?
    [ $rc = 0 ] || fail "VMM exit status $rc"
    want "$S/reboot.log" "first-boot"
    want "$S/reboot.log" "second-boot"
    want "$S/reboot.log" "loader=ff"
    [ "$(grep -c '^RQ: init' "$S/reboot.log")" = 2 ] || fail "expected two boots"
}

# nbd_serve PORT IMAGE FORMAT EXPORT [qemu-nbd options]: serves IMAGE on 127.0.0.1:PORT.
nbd_pids=""
nbd_serve() {
    local port=$1 img=$2 fmt=$3 name=$4 i
    shift 4
    qemu-nbd -t -b 127.0.0.1 -p "$port" -f "$fmt" -x "$name" "$@" "$img" >/dev/null 2>&1 &
    nbd_pids="$nbd_pids $!"
    for i in $(seq 50); do
        qemu-nbd --list -b 127.0.0.1 -p "$port" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "qemu-nbd on port $port did not start"
}

scenario_disks() {
    local f
    for f in none wb ds un io ro; do qemu-img create -q -f qcow2 "$S/d_$f.qcow2" 32M; done
    qemu-img create -q -f raw "$S/d_wt.raw" 32M
    # NBD drives in the three spellings, served by qemu-nbd: a qcow2 image behind an
    # nbd:// URL, a raw one behind nbd:HOST:PORT:exportname=, a read-only one through
    # driver=nbd,server.*. Each holds 0x4e ('N') at 4 MiB for the guest to read.
    qemu-img create -q -f qcow2 "$S/n_url.qcow2" 32M
    qemu-img create -q -f raw "$S/n_legacy.raw" 32M
    qemu-img create -q -f raw "$S/n_ro.raw" 32M
    qio -f qcow2 -c 'write -P 0x4e 4M 1M' "$S/n_url.qcow2"
    qio -f raw -c 'write -P 0x4e 4M 1M' "$S/n_legacy.raw"
    qio -f raw -c 'write -P 0x4e 4M 1M' "$S/n_ro.raw"
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
    local p=$((20000 + $$ % 20000))
    nbd_serve $p "$S/n_url.qcow2" qcow2 url
    nbd_serve $((p + 1)) "$S/n_legacy.raw" raw legacy
    nbd_serve $((p + 2)) "$S/n_ro.raw" raw ro -r
    boot disks "$S/disks.log" -smp 2 -m 384 -object iothread,id=io0 \
        -drive file="$S/d_none.qcow2",if=virtio,cache=none,aio=native \
        -drive file="$S/d_wb.qcow2",if=virtio,cache=writeback,aio=threads \
        -drive file="$S/d_wt.raw",format=raw,if=virtio,cache=writethrough,aio=io_uring \
        -drive file="$S/d_ds.qcow2",if=virtio,cache=directsync,aio=threads \
        -drive file="$S/d_un.qcow2",if=virtio,cache=unsafe,aio=io_uring \
        -drive file="$S/d_ro.qcow2",if=virtio,readonly=on \
        -drive file="$S/d_io.qcow2",if=none,id=dio,cache=none,aio=io_uring \
        -device virtio-blk-pci,drive=dio,iothread=io0,num-queues=2,serial=IOTHREAD0 \
        -drive file=nbd://127.0.0.1:$p/url,format=raw,if=virtio,serial=NBD_URL \
        -drive file=nbd:127.0.0.1:$((p + 1)):exportname=legacy,format=raw,if=virtio,serial=NBD_LEGACY \
        -drive driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$((p + 2)),export=ro,readonly=on,if=virtio,serial=NBD_RO
    local rc=$?
    kill $nbd_pids 2>/dev/null
    wait $nbd_pids 2>/dev/null
    nbd_pids=""
    [ $rc = 0 ] || fail "VMM exit status $rc"
    local l
    for l in a b c d e g h j; do want "$S/disks.log" "vd$l rw=ok"; done
    want "$S/disks.log" "vdf ro-write=refused"
    want "$S/disks.log" "vdi ro-write=refused"
    for l in g h i; do want "$S/disks.log" "vd$l nbd-read=ok"; done
    qemu-img check -q "$S/n_url.qcow2" || fail "qemu-img check n_url.qcow2"
    qio -f qcow2 -c 'read -P 0x67 1M 1M' "$S/n_url.qcow2" || fail "pattern g not in the nbd:// image"
    qio -f raw -c 'read -P 0x68 1M 1M' "$S/n_legacy.raw" || fail "pattern h not in the nbd: image"
    qio -f raw -c 'read -P 0 0 4M' "$S/n_ro.raw" || fail "read-only nbd image was written"
    grep -q '^RQ: vda .*wc=write_back' "$S/disks.log" || fail "cache=none must show a write-back cache"
    grep -q '^RQ: vdc .*wc=write_through' "$S/disks.log" || fail "cache=writethrough must show a write-through cache"
    grep -q '^RQ: vdd .*wc=write_through' "$S/disks.log" || fail "cache=directsync must show a write-through cache"
    grep -q '^RQ: vdj serial=IOTHREAD0 .*queues=2 ' "$S/disks.log" || fail "-device serial/num-queues not seen"
    # Guest disk letters follow PCI order: the if=virtio drives, then -device.
    local entry img letter hex
    for entry in d_none.qcow2:a d_wb.qcow2:b d_wt.raw:c d_ds.qcow2:d d_un.qcow2:e d_ro.qcow2:f d_io.qcow2:j; do
        img=${entry%:*}
        letter=${entry#*:}
        hex=$(printf '0x%x' "'$letter")
        case $img in
            *.qcow2) qemu-img check -q "$S/$img" || fail "qemu-img check $img" ;;
        esac
        if [ "$img" = d_ro.qcow2 ]; then
            qio -f qcow2 -c 'read -P 0 0 32M' "$S/$img" || fail "read-only image was written"
            continue
        fi
        local fmt=qcow2
        [ "${img##*.}" = raw ] && fmt=raw
        qio -f $fmt -c "read -P $hex 1M 1M" "$S/$img" || fail "pattern $letter not in $img"
    done
}

overall=0
for n in $names; do
    t0=$(date +%s)
    "scenario_$n"
    out=$(report "$n" "$t0" "$S/$n.log")
    fails=""
    echo "$out"
    case $out in "SCENARIO $n FAIL"*) overall=1 ;; esac
done
exit $overall

# Shared helpers of the VM test and benchmark scripts: finding the guest kernel and
# building busybox initramfs images with modules of that kernel.

# The newest kernel in /boot and its version.
vm_kernel() {
    local k
    k=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$k" ] || return 1
    echo "$k"
}

vm_kernel_version() {
    basename "$(vm_kernel)" | sed 's/^vmlinuz-//'
}

# vm_elf_kernel OUT: the guest kernel as an ELF vmlinux, taken out of the bzImage (its
# payload is found by the compressor's magic bytes and decompressed), checked to carry
# the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12, owner "Xen").
vm_elf_kernel() {
    local k out=$1 magic tool off
    k=$(vm_kernel) || return 1
    for magic in xz gzip zstd; do
        case $magic in
            xz) off=$(grep -abo $'\xfd7zXZ\x00' "$k" | head -n 1 | cut -d: -f1); tool="xz -dc" ;;
            gzip) off=$(grep -abo $'\x1f\x8b\x08' "$k" | head -n 1 | cut -d: -f1); tool="gzip -dc" ;;
            zstd) off=$(grep -abo $'\x28\xb5\x2f\xfd' "$k" | head -n 1 | cut -d: -f1); tool="zstd -dc" ;;
        esac
        [ -n "$off" ] || continue
        # The payload is followed by other data: decompressors complain, the ELF is whole.
        tail -c +$((off + 1)) "$k" | $tool 2>/dev/null > "$out"
        if [ "$(head -c 4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ]; then
            readelf -n "$out" 2>/dev/null | grep -q 'Xen.*(0x00000012)' && return 0
            echo "vm_elf_kernel: $k has no PVH entry note" >&2
            return 1
        fi
    done
    echo "vm_elf_kernel: no ELF payload found in $k" >&2
    return 1
}

# mk_initramfs DIR OUT: packs DIR as a gzip'd newc cpio.
mk_initramfs() {
    (cd "$1" && find . | cpio -o -H newc --quiet) | gzip -1 > "$2"
}

# add_busybox ROOT: a static busybox as ROOT/bin/busybox with sh.
add_busybox() {
    mkdir -p "$1/bin" "$1/proc" "$1/sys" "$1/dev" "$1/tmp" "$1/lib/modules"
    cp /bin/busybox "$1/bin/busybox"
    ln -sf busybox "$1/bin/sh"
}

# add_modules ROOT VERSION NAME...: copies each module to ROOT/lib/modules/NAME.ko.
add_modules() {
    local root=$1 ver=$2 m f
    shift 2
    for m in "$@"; do
        f=$(find "/lib/modules/$ver/kernel" -name "$m.ko" | head -n 1)
        [ -n "$f" ] || { echo "module $m not found for $ver" >&2; return 1; }
        cp "$f" "$root/lib/modules/$m.ko"
    done
}

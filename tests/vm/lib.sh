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

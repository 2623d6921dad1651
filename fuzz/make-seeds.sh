#!/usr/bin/env bash
# make-seeds.sh - small valid images (qcow2 and LUKS made by qemu-img and qemu-io,
# bzImages made here) as the starting corpora of the fuzz targets.
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/qcow2_open
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for o in cluster_size=512 cluster_size=512,compat=0.10 cluster_size=512,refcount_bits=1 \
         cluster_size=512,lazy_refcounts=on cluster_size=16k,extended_l2=on; do
    img="$tmp/seed.qcow2"
    rm -f "$img"
    qemu-img create -q -f qcow2 -o "$o" "$img" 64k
    qemu-io -c 'write -P 1 0 1k' -c 'write -z 8k 1k' "$img" >/dev/null 2>&1
    qemu-io -c 'write -c 16k 16k' "$img" >/dev/null 2>&1 || true
    cp "$img" "$out/seed-$i"
    i=$((i + 1))
done
echo "seeds in $out"
# luks_header: small LUKS volumes (cheap key slots: iter-time=1 gives QEMU's minimum of
# 1000 iterations), password "fuzz" as the target defines it.
out=corpus/luks_header
mkdir -p "$out"
i=0
for o in "" ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1"; do
    img="$tmp/seed.luks"
    rm -f "$img"
    qemu-img create -q -f luks --object secret,id=s,data=fuzz \
        -o "key-secret=s,iter-time=1$o" "$img" 4k
    cp "$img" "$out/seed-$i"
    i=$((i + 1))
done
echo "seeds in $out"
# bzimage_unpack: small bzImages around a one-segment ELF with a relocation table,
# gzip and xz payloads.
out=corpus/bzimage_unpack
mkdir -p "$out"
python3 - "$out" <<'PY'
import gzip, lzma, struct, sys
out = sys.argv[1]
text_v, text_p = 0xffffffff81000000, 0x1000000
elf = bytearray(0x200)
elf[0:6] = b"\x7fELF\x02\x01"
struct.pack_into("<H", elf, 0x12, 62)
struct.pack_into("<QQ", elf, 0x18, text_p, 64)
struct.pack_into("<HH", elf, 0x36, 56, 1)
struct.pack_into("<IIQQQQQQ", elf, 64, 1, 5, 0x100, text_v, text_p, 0x100, 0x3000, 0x1000)
struct.pack_into("<Q", elf, 0x110, text_v + 0x80)
rel = lambda off: struct.pack("<i", ((text_v + off) & 0xffffffff) - (1 << 32))
elf += b"\0" * 4 + rel(0x10) + b"\0" * 4 + rel(0x30) + b"\0" * 4 + rel(0x20)
for name, packed in [("gz", gzip.compress(bytes(elf), mtime=0)),
                     ("xz", lzma.compress(bytes(elf), check=lzma.CHECK_CRC32))]:
    payload = packed + struct.pack("<I", len(elf))
    img = bytearray(1024)
    img[0x1f1] = 1
    struct.pack_into("<IH", img, 0x202, 0x53726448, 0x20F)
    img[0x211] = 1
    struct.pack_into("<IB", img, 0x230, 2 << 20, 1)
    struct.pack_into("<I", img, 0x24C, len(payload))
    struct.pack_into("<I", img, 0x260, 0x4000)
    open(f"{out}/seed-{name}", "wb").write(bytes(img) + payload)
PY
echo "seeds in $out"

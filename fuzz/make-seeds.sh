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
# qemu_opts, nbd_handshake, blkdebug_config: hand-written inputs (the first byte picks
# the parser or the target's mode, as each target describes).
python3 - <<'PY'
import os, struct
def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    open(f"corpus/{target}/seed-{name}", "wb").write(data)

for i, (mode, s) in enumerate([
    (0, "driver=qcow2,file.driver=file,file.filename=a,,b.img,cache.direct=on"),
    (0, "server,nowait,id=x"),
    (1, "disk.img,if=virtio,cache=none,format=raw"),
    (1, "my,,disk.img"),
    (2, 'json:{"driver":"qcow2","file":{"driver":"file","filename":"x,y"}}'),
    (2, "json:{'driver': 'raw', 'file': {'filename': 'a\\'b'}, 'n': [1, true, null, 2.5]}"),
    (3, "1.5G"), (3, "0x100"), (3, " +16E"), (3, "1.0000000001k"), (4, "512"),
    (5, "0x1c"), (5, "010"), (5, "-5"),
    (6, "on"),
    (7, "nbd://localhost:10809/exp"),
    (7, "nbd+unix:///exp?socket=/tmp/s"),
    (7, "nbd:unix:/tmp/s:exportname=e"),
    (7, "nbd:[::1]:10809"),
    (7, "\nserver.type=inet,server.host=h,server.port=1,export=e,open-timeout=3"),
    (7, "\nhost=h,port=10809,x-dirty-bitmap=qemu:dirty-bitmap:b"),
]):
    put("qemu_opts", str(i), bytes([mode]) + s.encode())

# nbd_handshake: mode (name, context, read size), greeting, then one answer per option.
u32 = lambda v: struct.pack(">I", v)
u64 = lambda v: struct.pack(">Q", v)
size = u64(1 << 20)
go_ok = b"\x81" + size + b"\x00\x01" + b"\x82\x00\x0c\x19" + b"\x00"
put("nbd_handshake", "fixed-go", b"\x00" + b"\x00\x03" + b"\x00" + b"\x84" + u32(1) + b"\x00" + go_ok)
put("nbd_handshake", "no-go", b"\x00" + b"\x00\x01" + b"\x06\x00" + b"\x06\x00" + b"\x00" + size + b"\x00\x01")
put("nbd_handshake", "oldstyle", b"\x00" + b"\x02" + size + u32(1))
put("nbd_handshake", "not-fixed", b"\x08" + b"\x00\x02" + b"\x00" + size + b"\x00\x03")
put("nbd_handshake", "bitmap-denied", b"\x05" + b"\x00\x03" + b"\x00" + b"\x07\x05nope!" + go_ok)
put("nbd_handshake", "unknown-export", b"\x01" + b"\x00\x03" + b"\x00" + b"\x84" + u32(7) + b"\x00" + b"\x0b\x07no such")

# blkdebug_config: mode 0 a config file, mode 1 a filename and options; after a NUL,
# events (even first byte), requests, breakpoints and resumes.
script = b"\x00\x00\x00\x04\x01\x00\x05\x01\x00\x02\x09\x00\x02\x04\x01\x00\x03\x00"
put("blkdebug_config", "config", b"\x00" + b"""# iotest style
[inject-error]
event = "l2_load"
errno = "5"
once = "on"

[set-state]
state = "1"
event = "l2_update"
new_state = "2"

[inject-error]
state = "2"
event = "read_aio"
errno = "28"
immediately = "off"
sector = "0"
iotype = "read"
""" + b"\x00" + script)
put("blkdebug_config", "options", b"\x01" + b"blkdebug:c.conf:t.qcow2\n"
    b"align=4k,max-transfer=64k,inject-error.0.event=read_aio,inject-error.0.errno=0x1c,"
    b"inject-error.0.sector=8,set-state.0.event=none,set-state.0.new_state=2"
    + b"\x00" + script)
# QEMU keeps errno and states in an int: 2^32 is errno 0, no error injected.
put("blkdebug_config", "int-wrap", b"\x00" + b"[inject-error]\nevent = \"none\"\n"
    b"errno = \"4294967296\"\n[set-state]\nevent = \"read_aio\"\nstate = \"4294967297\"\n"
    b"new_state = \"-1\"\n" + b"\x00" + script)
PY
echo "seeds in corpus/qemu_opts corpus/nbd_handshake corpus/blkdebug_config"
# blklogwrites_log: logs of a few writes, a zero write, a discard and flushes, written by
# the blklogwrites driver through rqemu-io (512-byte and 4 KiB log sectors).
out=corpus/blklogwrites_log
mkdir -p "$out"
rqemu_io=../target/release/rqemu-io
i=0
for ss in 512 4096; do
    qemu-img create -q -f raw "$tmp/img" 64k
    : > "$tmp/log"
    "$rqemu_io" -c 'write -P 1 0 4k' -c 'write -P 2 100 50' -c 'write -z 8k 4k' \
        -c 'discard 16k 8k' -c flush \
        "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"blklogwrites\",\"log-sector-size\":$ss,\"file\":{\"driver\":\"file\",\"filename\":\"$tmp/img\"},\"log\":{\"driver\":\"file\",\"filename\":\"$tmp/log\"}}}" >/dev/null
    cp "$tmp/log" "$out/seed-$i"
    i=$((i + 1))
done
echo "seeds in $out"
# The regression seed of the blklogwrites_log finding: one discard of 2^50 bytes.
python3 - "$out/oom-regression" <<'PY'
import struct, sys
log = struct.pack('<QQQI', 0x6a736677736872, 1, 1, 512).ljust(512, b'\0')
log += struct.pack('<QQQQ', 0, 1 << 41, 4, 0).ljust(512, b'\0')
open(sys.argv[1], 'wb').write(log)
PY

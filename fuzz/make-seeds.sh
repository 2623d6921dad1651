#!/usr/bin/env bash
# make-seeds.sh - small valid qcow2 images (made by qemu-img and qemu-io) as the starting
# corpus of the qcow2_open fuzz target.
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

#!/usr/bin/env bash
# luks-io.sh - encryption throughput: rqemu-io against qemu-io writing and then reading
# a whole LUKS-encrypted qcow2 image (aes-256-xts-plain64, QEMU's default) in one
# request, `--object secret,... --image-opts ...,encrypt.key-secret=...`, interleaved,
# median of RUNS runs, on /dev/shm. Each write goes to a freshly created image.
#
#   bench/luks-io.sh             # builds the release binaries first
#   RUNS=7 SIZE=512M bench/luks-io.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SIZE=${SIZE:-256M}
cargo build --release -q
RQIO=$PWD/target/release/rqemu-io
W=$(mktemp -d /dev/shm/rqluks.XXXXXX)
trap 'rm -rf "$W"' EXIT
SECRET="secret,id=sec0,data=benchmark"
python3 - "$W" "$SIZE" "$RQIO" "$RUNS" "$SECRET" <<'PY'
import statistics, subprocess, sys, time
w, size, rqio, runs, secret = sys.argv[1:6]
img = f"{w}/t.qcow2"
spec = f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
tools = {"rqemu-io": rqio, "qemu-io": "qemu-io"}
res = {(t, op): [] for t in tools for op in ("write", "read")}
def create():
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", secret, "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                    img, size], check=True)
def run(tool, cmd):
    t = time.monotonic()
    subprocess.run([tools[tool], "--object", secret, "-c", cmd, "--image-opts", spec],
                   check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t
for _ in range(int(runs)):
    for tool in tools:
        create()
        res[(tool, "write")].append(run(tool, f"write -P 0x5a 0 {size}"))
        res[(tool, "read")].append(run(tool, f"read -P 0x5a 0 {size}"))
mib = int(size.rstrip("M"))
print(f"| {size} luks qcow2, one request | rqemu-io | qemu-io | rqemu/QEMU |")
print("|---|---:|---:|---:|")
for op in ("write", "read"):
    r = statistics.median(res[("rqemu-io", op)])
    q = statistics.median(res[("qemu-io", op)])
    print(f"| {op} (median of {runs}) | {r:.2f} s ({mib / r:.0f} MiB/s) | "
          f"{q:.2f} s ({mib / q:.0f} MiB/s) | {q / r:.2f} |")
PY

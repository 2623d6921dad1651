#!/usr/bin/env bash
# fetch.sh CACHE_DIR - puts QEMU 10.0.2's qemu-iotests into CACHE_DIR/qemu-10.0.2.
#
# The suite comes from Debian's qemu source package (the orig tarball of the
# bookworm-backports release), fetched with apt under a private state directory, so
# nothing on the machine is installed or reconfigured. Only the test directory and what
# it imports are unpacked. Prints one line and exits non-zero when it cannot.
set -eu
cache=${1:?usage: fetch.sh CACHE_DIR}
version=10.0.2
tarball=qemu_${version}+ds.orig.tar.xz
mkdir -p "$cache"
cd "$cache"
if [ -x "qemu-$version/tests/qemu-iotests/check" ]; then
    exit 0
fi
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 | cut -d' ' -f1)
if [ -z "$mirror" ]; then
    echo "fetch.sh: no Debian archive configured in /etc/apt/sources.list.d/debian.sources" >&2
    exit 1
fi
state=$cache/apt-state
mkdir -p "$state/lists/partial" "$state/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" \
    > "$state/sources.list"
opts=(-o "Dir::Etc::SourceList=$state/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
      -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state" -o "Debug::NoLocking=1")
if ! apt-get -qq "${opts[@]}" update >/dev/null 2>&1; then
    echo "fetch.sh: cannot reach the Debian archive at $mirror" >&2
    exit 1
fi
# Only the orig tarball is still in the pool: apt downloads it, then fails on the rest.
apt-get -qq "${opts[@]}" source --download-only "qemu=1:${version}+ds-2+deb13u1~bpo12+1" >/dev/null 2>&1 || true
if [ ! -f "$tarball" ]; then
    echo "fetch.sh: $tarball could not be downloaded" >&2
    exit 1
fi
tar -xJf "$tarball" --wildcards \
    "qemu-$version/tests/qemu-iotests/*" "qemu-$version/python/*" \
    "qemu-$version/docs/interop/*" "qemu-$version/docs/tools/*"
rm -f "$tarball"

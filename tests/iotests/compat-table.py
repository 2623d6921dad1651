#!/usr/bin/env python3
"""Writes docs/compatibility.md from tests/iotests/expected.txt: per format, QEMU's
passes, rqemu's passes, the deliberate exclusions and the tests still failing, with
their reasons."""
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
QEMU_PASSES = {"qcow2": 127, "raw": 36, "luks": 21}

rows = collections.OrderedDict((f, collections.Counter()) for f in QEMU_PASSES)
reasons = {"exclude": collections.OrderedDict(), "todo": collections.OrderedDict()}
for line in (ROOT / "tests/iotests/expected.txt").read_text().splitlines():
    if not line or line.startswith("#"):
        continue
    kind, fmt, test, *why = line.split(maxsplit=3)
    rows.setdefault(fmt, collections.Counter())[kind] += 1
    if kind in reasons:
        reasons[kind].setdefault(why[0] if why else "no reason given", []).append(f"{fmt} {test}")

out = [
    "# Compatibility with QEMU's own test suite",
    "",
    "QEMU 10.0.2's qemu-iotests run against rqemu's binaries (`tests/iotests.rs`, part of the",
    "test command; the suite is fetched once from Debian's source package). Of the 172 tests",
    "that use only qemu-img, qemu-io and qemu-nbd, these are the ones QEMU's own binaries pass",
    "on these machines, and how rqemu does on them. `tests/iotests/expected.txt` is the",
    "source of this table (`tests/iotests/compat-table.py` writes it): every `pass` line",
    "there is checked on each run.",
    "",
    "| format | QEMU passes | rqemu passes | deliberately excluded | still failing |",
    "|---|---|---|---|---|",
]
for fmt, c in rows.items():
    out.append(f"| {fmt} | {QEMU_PASSES.get(fmt, '?')} | {c['pass']} | {c['exclude']} | {c['todo']} |")
out += [
    "",
    "rqemu-nbd does not exist yet: where a test needs an NBD server, the harness runs QEMU's",
    "qemu-nbd.",
]
for kind, title in (("exclude", "Excluded deliberately"), ("todo", "Still failing")):
    out.append("")
    if not reasons[kind]:
        out.append(f"{title}: none.")
        continue
    out.append(f"{title}, by cause:")
    out.append("")
    for why, tests in reasons[kind].items():
        out.append(f"- {why}: {', '.join(tests)}")
(ROOT / "docs/compatibility.md").write_text("\n".join(out) + "\n")

"""Which kind of CPU this is, as far as onnxruntime's 8-bit integer kernels are concerned.

x86 without a VNNI instruction (AVX2, AVX-512 without VNNI, and older) multiplies uint8 x int8 with
VPMADDUBSW, which adds each pair of neighbouring products into an int16 *with saturation*; VNNI
(VPDPBUSD: AVX-512 VNNI or AVX-VNNI), AMX and ARM accumulate in int32 and are exact. The two
behaviours are named by `ISAS`: "avx2" (pairwise int16 saturation of u8 x s8 kernels) and "exact".
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from rcdeploy.errors import UsageError
from rcdeploy.names import ISAS as ISA_NAMES

__all__ = ["ISAS", "CpuKind", "cpu_kind", "resolve_isa"]

ISAS = tuple(ISA_NAMES.names())  # exact, avx2: declared in rcdeploy.names
# Overrides what /proc/cpuinfo says, for emulators whose code runs on another CPU than the host's
# /proc/cpuinfo describes (qemu-user passes the host's file through).
ISA_ENV = "RCDEPLOY_ISA"
# Any one of these gives onnxruntime an int32-accumulating u8 x s8 kernel on x86.
_EXACT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class CpuKind:
    """The facts that decide what an integer kernel computes here."""

    machine: str  # platform.machine(), lower case
    flags: frozenset[str]  # the int8-relevant flags found in /proc/cpuinfo
    model: str = ""
    forced: str | None = None  # ISA_ENV's value, when set

    @property
    def is_x86(self) -> bool:
        return self.machine in _X86

    @property
    def isa(self) -> str:
        """"avx2" where u8 x s8 pair sums saturate at int16 (x86 without VNNI/AMX), else "exact"."""
        if self.forced:
            return self.forced
        if self.is_x86 and not any(f in self.flags for f in _EXACT_FLAGS):
            return "avx2"
        return "exact"

    def describe(self) -> str:
        """One line for reports, e.g. 'x86_64 avx512_vnni: u8 x s8 kernels exact'."""
        found = [f for f in (*_EXACT_FLAGS, "avx512f", "avx2") if f in self.flags]
        what = ("u8 x s8 pair sums saturate at int16" if self.isa == "avx2" else "u8 x s8 kernels exact")
        name = f" ({self.model})" if self.model else ""
        forced = f" ({ISA_ENV}={self.forced})" if self.forced else ""
        return f"{self.machine} {'/'.join(found) or 'no AVX2/VNNI flags'}{name}: {what}{forced}"

    def to_dict(self) -> dict[str, object]:
        return {"machine": self.machine, "model": self.model, "flags": sorted(self.flags), "isa": self.isa,
                "description": self.describe()}


def cpu_kind(cpuinfo: str | None = None, machine: str | None = None) -> CpuKind:
    """The CPU kind of this machine (or of a given /proc/cpuinfo text, for tests; ISA_ENV then is ignored)."""
    machine = (machine or platform.machine() or "unknown").lower()
    reading_this_cpu = cpuinfo is None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: no flags to read
            cpuinfo = ""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    wanted = {*_EXACT_FLAGS, "avx2", "avx512f"}
    forced = (os.environ.get(ISA_ENV, "").strip().lower() or None) if reading_this_cpu else None
    if forced is not None and forced not in ISAS:
        raise UsageError(f"{ISA_ENV}={forced!r} is not one of: {', '.join(ISAS)}")
    return CpuKind(machine, frozenset(flags & wanted), model, forced)


def resolve_isa(isa: str | None) -> str:
    """"exact" or "avx2"; None or "native" means what this CPU does. Anything else is a UsageError."""
    if isa is None or isa == "native":
        return cpu_kind().isa
    name = str(isa).strip().lower()
    if name not in ISAS:
        raise UsageError(f"unknown --isa {isa!r}; choose one of: {', '.join(ISAS)} (default: what this CPU does, "
                         f"here {cpu_kind().isa})")
    return name

"""Reading the GPU kernels' machine code (SASS) without a GPU: the facts the guards of
``tools.aot`` check (load widths in the hot loops, barriers per tile, atomics,
what the finalisation's loops over parts contain).

SASS comes from ``cuobjdump -sass`` (the CUDA toolkit's, or the copy Triton ships); a loop
is a backward branch and the instructions from its target up to it. Static counts inside
a loop stand for per-iteration counts: a loop's inner loops are reported too, and the
guards ask that those hold no barrier.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass
class Instr:
    addr: int
    opcode: str
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Loop:
    start: int  # address of the branch target
    end: int  # address of the backward branch
    body: list[Instr] = field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def cuobjdump() -> str:
    """cuobjdump from $CUDA_HOME, PATH or Triton's bundled NVIDIA tools."""
    home = os.environ.get("CUDA_HOME")
    candidates = [Path(home) / "bin" / "cuobjdump"] if home else []
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        candidates.append(bundled / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c.exists():
            return str(c)
    raise RuntimeError("no cuobjdump (CUDA toolkit, or the one Triton ships)")


def disassemble(cubin: bytes | str | os.PathLike) -> dict[str, list[Instr]]:
    """{function (mangled name): instructions} of a cubin (bytes or a path)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin
        if isinstance(cubin, bytes):
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
        text = subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    functions: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        if "Function :" in line:
            current = line.split("Function :", 1)[1].strip()
            functions[current] = []
            continue
        m = _LINE.search(line)
        if m and current is not None:
            functions[current].append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(),
                                            bool(m.group(2))))
    return functions


def loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch as a loop, outermost first; but not a branch from code placed
    out of line after the kernel's end (divergent shuffles' fallbacks, the division's slow
    path) back into it: such a range holds an unconditional EXIT or RET, a loop never."""
    found = []
    for i in instrs:
        if i.base == "BRA" and not i.opcode.startswith("BRA.DIV"):
            t = _TARGET.search(i.operands)
            if t and int(t.group(1), 16) < i.addr:
                start = int(t.group(1), 16)
                body = [j for j in instrs if start <= j.addr <= i.addr]
                if not any(j.base in ("EXIT", "RET") and not j.predicated for j in body):
                    found.append(Loop(start, i.addr, body))
    return sorted(found, key=lambda lp: (lp.start, -lp.end))


def is_barrier(i: Instr) -> bool:
    return i.base == "BAR" and ".SYNC" in i.opcode or i.opcode in ("BAR.SYNC", "BAR.RED", "BAR")


def _width(i: Instr) -> int:
    """Bits of a memory instruction, from its opcode's suffix (32 when it names none)."""
    for part in i.opcode.split(".")[1:]:
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
        if part.isdigit():
            return int(part)
    return 32


def global_load_width(i: Instr) -> int | None:
    """Bits of a global load (LDG), None for anything else. Asynchronous copies (LDGSTS)
    are not loads into registers: None."""
    return _width(i) if i.base == "LDG" else None


def global_store_width(i: Instr) -> int | None:
    return _width(i) if i.base == "STG" else None


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64", "F16x2", "BF16x2", "FTZ")


def atomics(instrs: list[Instr]) -> list[Instr]:
    return [i for i in instrs if i.base in ("ATOM", "ATOMG", "RED", "REDG", "ATOMS", "REDUX")
            and i.base != "REDUX"]


def is_float_atomic(i: Instr) -> bool:
    return any(p in _FLOAT_TYPES for p in i.opcode.split(".")[1:])


def is_division(i: Instr) -> bool:
    """Reciprocal or division steps: MUFU.RCP(64H), FCHK (the IEEE division's check)."""
    return (i.base == "MUFU" and "RCP" in i.opcode) or i.base == "FCHK"


def is_call(i: Instr) -> bool:
    return i.base in ("CALL", "JCAL")


def acquire_release_ticket(instrs: list[Instr]) -> bool:
    """One integer atomic add at GPU scope, with a memory barrier just before it (release)
    and an L1 invalidation after it, before the next barrier or global load (acquire): how
    acq_rel lowers on sm_70 and later."""
    atoms = atomics(instrs)
    if len(atoms) != 1 or is_float_atomic(atoms[0]) or ".ADD" not in atoms[0].opcode:
        return False
    k = instrs.index(atoms[0])
    release = any(i.opcode.startswith("MEMBAR") for i in instrs[max(0, k - 6):k])
    acquire = False
    for i in instrs[k + 1:]:
        if i.opcode.startswith("CCTL.IVALL"):
            acquire = True
            break
        if is_barrier(i) or global_load_width(i) or i.base in ("EXIT", "LDGSTS"):
            break
    return ".GPU" in atoms[0].opcode and release and acquire


def _count(instrs, predicate) -> int:
    return sum(1 for i in instrs if predicate(i))


def kernel_facts(instrs: list[Instr], kind: str) -> dict:
    """What the guards check of one kernel's SASS. ``kind``: "stats", "backward" or
    "finalize".

    stats: the tile loop (the innermost loop that waits for asynchronous copies, DEPBAR,
    else the largest loop that loads) and its barriers (static count; its inner loops'
    barriers separately), its global loads into registers narrower than 8 bytes and wider,
    and its asynchronous copies (LDGSTS). backward: the whole kernel's narrow and wide
    loads and stores. finalize: barriers, divisions and calls inside any loop. Every kind:
    atomics, floating-point atomics, and whether there is exactly one acquire-release
    integer ticket."""
    atoms = atomics(instrs)
    facts = {"atomics": len(atoms), "float_atomics": _count(atoms, is_float_atomic),
             "acq_rel_ticket": int(acquire_release_ticket(instrs))}
    found = loops(instrs)
    narrow = lambda i: (global_load_width(i) or 64) < 64  # noqa: E731
    wide = lambda i: (global_load_width(i) or 0) >= 64  # noqa: E731
    if kind == "stats":
        waiting = [lp for lp in found if any(i.opcode.startswith("DEPBAR") for i in lp.body)]
        loading = [lp for lp in found if any(global_load_width(i) or i.base == "LDGSTS"
                                             for i in lp.body)]
        hot = (min(waiting, key=lambda lp: len(lp.body)) if waiting
               else max(loading, key=lambda lp: len(lp.body)) if loading else None)
        body = hot.body if hot else []
        inner = [lp for lp in found if hot and hot.contains(lp)]
        facts.update(barriers_per_tile=_count(body, is_barrier),
                     inner_loop_barriers=sum(_count(lp.body, is_barrier) for lp in inner),
                     narrow_loads_hot=_count(body, narrow), wide_loads_hot=_count(body, wide),
                     async_loads_hot=_count(body, lambda i: i.base == "LDGSTS"))
    elif kind == "backward":
        facts.update(narrow_loads=_count(instrs, narrow), wide_loads=_count(instrs, wide),
                     narrow_stores=_count(instrs, lambda i: (global_store_width(i) or 64) < 64),
                     wide_stores=_count(instrs, lambda i: (global_store_width(i) or 0) >= 64),
                     barriers=_count(instrs, is_barrier))
    elif kind == "finalize":
        in_loops = [i for lp in found for i in lp.body]
        facts.update(loops=len(found), loop_barriers=_count(in_loops, is_barrier),
                     loop_divisions=_count(in_loops, is_division),
                     loop_calls=_count(in_loops, is_call))
    return facts

"""Count the collectives of a compiled XLA program, inside and outside its loops.

A DEQ's solver runs its iterations in `while` loops; a collective inside a loop body
runs once per iteration (its cost grows with the number of solver steps), one outside
runs once per call. This tool reads the text of a compiled program
(`jax.jit(step).lower(*args).compile().as_text()`), finds every computation reachable
from a `while` loop's body or condition, and lists each collective with its size:

    from hlo_collectives import collectives
    report = collectives(jax.jit(step).lower(*args).compile().as_text())
    report.inside    # {"all-reduce": 2, ...}: per loop iteration (summed over loops)
    report.outside   # once per call

Kinds counted: all-gather, all-reduce, all-to-all, collective-permute, reduce-scatter
(their asynchronous `-start` forms count once; `-done` halves are skipped).
"""

import dataclasses
import math
import re
from collections import Counter

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

# `ENTRY %main.1 (...) -> ... {` or `%region_0.2_spmd (...) -> ... {`; the name may
# lack its `%` in some XLA versions.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# `  %name = TYPE opcode(operands), attributes`; TYPE may be a tuple, with spaces and
# `/*index=5*/` comments inside, which `_instruction` skips by matching parentheses.
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(
    r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_LOOP = re.compile(r"\bcondition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


@dataclasses.dataclass
class Collectives:
    """The collectives of one program: counts by kind inside loop bodies and
    outside, and each one as `(kind, elements, "inside" | "outside")`."""

    inside: Counter
    outside: Counter
    ops: list[tuple[str, int, str]]

    def inside_sizes(self, kind: str) -> list[int]:
        """The element counts of the collectives of `kind` inside loops."""
        return sorted(n for k, n, where in self.ops if k == kind and where == "inside")


def _elements(type_text: str) -> int:
    """The number of elements of an HLO type: an array `f32[4,8]{1,0}` or a tuple."""
    return sum(math.prod(int(d) for d in dims.split(",") if d)
               for dims in _ARRAY.findall(type_text))


def _instruction(line: str) -> tuple[str, str] | None:
    """`(type, opcode)` of an instruction line, or None for any other line."""
    match = _DEFINITION.match(line)
    if match is None:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        depth = 0
        for end, char in enumerate(rest):  # noqa: B007 (`end` is read after the loop)
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        type_text, rest = rest[:end + 1], rest[end + 1:]
    else:
        type_text, _, rest = rest.partition(" ")
        rest = " " + rest
    opcode = _OPCODE.match(rest)
    return None if opcode is None else (type_text, opcode.group(1))


def collectives(hlo_text: str) -> Collectives:
    """Parse the text of a compiled HLO module; see the module's docstring."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            bodies[current] = []
        elif line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)

    def callees(lines: list[str]) -> set[str]:
        names = set()
        for line in lines:
            names.update(_CALLED.findall(line))
            for group in _BRANCHES.findall(line):
                names.update(n.strip().lstrip("%") for n in group.split(","))
        return names

    # Every computation reachable from a loop's condition or body runs per iteration.
    in_loop: set[str] = set()
    todo = [name for lines in bodies.values() for line in lines
            for pair in _LOOP.findall(line) for name in pair]
    while todo:
        name = todo.pop()
        if name in in_loop or name not in bodies:
            continue
        in_loop.add(name)
        todo.extend(callees(bodies[name]))

    inside, outside, ops = Counter(), Counter(), []
    for name, lines in bodies.items():
        where = "inside" if name in in_loop else "outside"
        for line in lines:
            parsed = _instruction(line)
            if parsed is None:
                continue
            type_text, opcode = parsed
            kind = opcode.removesuffix("-start")
            if kind not in KINDS or opcode.endswith("-done"):
                continue
            (inside if where == "inside" else outside)[kind] += 1
            ops.append((kind, _elements(type_text), where))
    return Collectives(inside, outside, ops)


def describe(report: Collectives) -> str:
    """One line: e.g. `in loops: 2 all-reduce (1, 64 elements); outside: 1 all-reduce`."""
    def part(counter: Counter, where: str) -> str:
        if not counter:
            return "none"
        sizes = {kind: sorted(n for k, n, w in report.ops if k == kind and w == where)
                 for kind in counter}
        return ", ".join(f"{n} {kind} ({', '.join(map(str, sizes[kind]))} elements)"
                         for kind, n in sorted(counter.items()))
    return f"in loops: {part(report.inside, 'inside')}; outside: {part(report.outside, 'outside')}"

"""What a compiled XLA program executes, read from its optimized HLO text, loops counted.

XLA's own `compiled.cost_analysis()` counts the body of a `while` once, so a model whose layers run
under `lax.scan` looks L times cheaper than the same model as a Python loop. This reader walks the
module from its entry computation and multiplies every `while` body by its `known_trip_count`
(fusions, calls and conditionals followed; a loop without a known trip count is counted once and
reported). Two measures:

- `dot_flops`: 2 x output elements x contracted elements of every `dot` (the matmuls);
- `moved_bytes[op]`: output bytes of data-movement instructions that materialise a buffer (copy,
  transpose, dynamic-slice, dynamic-update-slice, concatenate, pad, ...) -- where layout
  conversions and the stacking of a scan's per-layer values show up. A move inside a fusion is
  not counted (it is fused into its consumer); a fusion whose root is a move counts as that move.
  These are the compiling backend's decisions: a CPU compile shows the CPU's layouts, so compile
  on the device to see the GPU's.

`by_op_name` groups the dot FLOPs by the JAX source location in each instruction's metadata (layer
indices folded), to see which matmul a layout runs more often. Text formats of XLA vary between
versions; `tests/test_hlo_cost.py` checks the reader against programs of known cost.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_TYPE = r"(?:" + "|".join(_DTYPE_BYTES) + r")"
_HEAD = re.compile(r"^(ENTRY )?%([\w.\-]+) \((.*)\) -> .*\{\s*$")
_NAME = re.compile(r"^(?:ROOT )?%([\w.\-]+) = ")
_ARRAY = re.compile(r"(" + _TYPE + r")\[([\d,]*)\]")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")  # XLA:GPU's matmuls are custom calls to cuBLAS
_PARAM = re.compile(r"([\w.\-]+): (" + _TYPE + r")\[([\d,]*)\]")
_SKIP_CALLEES = ("reduce", "map", "scatter", "sort", "reduce-window", "select-and-scatter", "all-reduce")
MOVES = ("copy", "transpose", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "slice", "gather")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _instruction(line: str):
    """(name, (dtype, dims) of the result -- a tuple's first array --, opcode, operand names), or
    None for a line that is not an instruction. Types may be tuples; operands may carry their type."""
    m = _NAME.match(line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple type: skip to its matching parenthesis
        depth, end = 0, len(rest) - 1
        for pos, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = pos
                break
        type_text, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    array = _ARRAY.search(type_text)
    result = (array.group(1), _dims(array.group(2))) if array else None
    args = rest[op.end() :].split(")", 1)[0]
    return m.group(1), result, op.group(1), re.findall(r"%([\w.\-]+)", args)


@dataclasses.dataclass
class HloCost:
    dot_flops: int = 0
    moved_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_op_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    opaque_custom_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unknown_trip_counts: int = 0

    def as_dict(self) -> dict:
        return {
            "dot_gflops": self.dot_flops / 1e9,
            "moved_gib": {k: v / 2**30 for k, v in sorted(self.moved_bytes.items())},
            "moved_gib_total": sum(self.moved_bytes.values()) / 2**30,
            "unknown_trip_counts": self.unknown_trip_counts,
            "opaque_custom_calls": dict(self.opaque_custom_calls),
        }


def _parse(hlo: str):
    """computation name -> instruction lines; computation -> {value name: (dtype, dims)}; entry name."""
    comps: dict[str, list[str]] = {}
    shapes: dict[str, dict] = {}
    roots: dict[str, str] = {}  # computation -> the opcode of its ROOT instruction
    cur, entry = None, None
    for line in hlo.splitlines():
        s = line.strip()
        if cur is None:
            m = _HEAD.match(s)
            if m:
                cur = m.group(2)
                comps[cur], shapes[cur] = [], {}
                entry = cur if m.group(1) else entry
                for p in _PARAM.finditer(m.group(3)):
                    shapes[cur][p.group(1)] = (p.group(2), _dims(p.group(3)))
            continue
        if s == "}":
            cur = None
            continue
        comps[cur].append(s)
        inst = _instruction(s)
        if inst:
            if inst[1] is not None:
                shapes[cur][inst[0]] = inst[1]
            if s.startswith("ROOT "):
                roots[cur] = inst[2]
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, shapes, roots, entry


def _dot_flops(line: str, inst, table: dict) -> int:
    """2 x output elements x contracted elements, for a dot or a cuBLAS gemm custom call."""
    _, (_, out), op, operands = inst
    lhs = table[operands[0]][1]
    if op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        contracted = [lhs[i] for i in _dims(m.group(1))] if m else []
    else:  # backend_config {"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"], ...}}
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
        contracted = [lhs[int(x.strip('" '))] for x in m.group(1).split(",") if x.strip('" ')] if m else []
    return 2 * math.prod(out) * math.prod(contracted)


def _moved(inst, table: dict) -> int:
    """Bytes a move writes: its output, except a dynamic-update-slice, which writes its update in place."""
    name, result, op, operands = inst
    dtype, dims = table[operands[1]] if op == "dynamic-update-slice" else result
    return _DTYPE_BYTES[dtype] * math.prod(dims)


def analyze(hlo: str) -> HloCost:
    """The cost of one execution of the module's entry computation."""
    comps, shapes, roots, entry = _parse(hlo)
    cost = HloCost()

    def walk(name: str, times: int, fused: bool = False) -> None:
        for s in comps.get(name, []):
            inst = _instruction(s)
            op = inst[2] if inst else None
            if op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", s).group(1)
                root = roots.get(callee)
                if root in MOVES:  # a fused move still writes its output
                    line = next(x for x in comps[callee] if x.startswith("ROOT "))
                    cost.moved_bytes[root] += _moved(_instruction(line), shapes[callee]) * times
                walk(callee, times, fused=True)  # moves inside are fused into their consumers
                continue
            target = re.search(r'custom_call_target="([^"]*)"', s) if op == "custom-call" else None
            if op == "dot" or (target and target.group(1) in _GEMM_TARGETS):
                flops = _dot_flops(s, inst, shapes[name]) * times
                cost.dot_flops += flops
                meta = re.search(r'op_name="([^"]*)"', s)
                cost.by_op_name[re.sub(r"_\d+", "_#", meta.group(1)) if meta else "?"] += flops
            elif target:  # cuDNN attention, Pallas / Triton kernels: work this reader cannot see into
                cost.opaque_custom_calls[target.group(1)] += times
            elif op in MOVES and not fused:
                cost.moved_bytes[op] += _moved(inst, shapes[name]) * times
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", s).group(1)
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', s)
                cost.unknown_trip_counts += n is None
                walk(body, times * (int(n.group(1)) if n else 1), fused)
                continue
            if op in _SKIP_CALLEES:
                continue  # their to_apply is a scalar reducer, not work of its own
            for callee in re.finditer(r"(?:calls|to_apply)=%?([\w.\-]+)", s):
                walk(callee.group(1), times, fused)
            branches = re.search(r"branch_computations=\{([^}]*)\}", s) or re.search(
                r"true_computation=%?([\w.\-]+)", s
            )
            if branches:  # counted as its first (true) branch: the cost of a conditional is not static
                walk(branches.group(1).split(",")[0].strip().lstrip("%"), times, fused)

    walk(entry, 1)
    return cost


def of_compiled(compiled) -> HloCost:
    """`analyze` of a `jax.stages.Compiled` (what `jit(f).lower(...).compile()` returns)."""
    return analyze(compiled.as_text())

"""Where a benchmark step spends its time on the CPU: JAX's compiled step by op kind
(matmuls, convolutions, the rest) and PyTorch's eager step by operator (`torch_top_ops`).

`thunk_breakdown(call, calls)` runs `call()` (which must block until its result is ready)
`calls` times under `jax.profiler` and sums the durations of the XLA:CPU runtime's thunks
(one event per executed HLO op or fusion; the CPU runtime runs them one after another,
each one spread over the allowed cores) by kind:

  matmul  dot thunks: `dot.*`, and the library fusions XLA hands to YNNPACK / XNNPACK /
          oneDNN (`ynn_fusion.*`, `xnn_fusion.*`, `onednn_*`) - in these steps those
          fusions are dots (their HLO shows a `dot` root), optionally with fused epilogues
  conv    `convolution.*` thunks and convolution fusions (`conv_general_dilated.*`)
  other   every other fusion, copy, sort, reduce, collective ... (XLA's own loops: the
          element-wise work, the transposes layout assignment inserts, sampling)

With the compiled program's HLO (`thunk_breakdown(..., hlo_text=compiled.as_text())`,
`hlo_kinds`), each thunk is classified by what it computes instead of its name: `matmul`
(a dot, or a fusion containing one), `conv`, `scatter` (a scatter or a fusion containing
one: autodiff's scatter-add of a gather's cotangent), `gather` (a gather or a fusion
containing one: table lookups, `jnp.take`) and `other`; the summary then also has
`gather_ms`, `scatter_ms` and `shares` (each kind's fraction of the ops' time). With
`scopes` (`[(label, substrings)]`) it also sums the time by where each op came from in the
JAX program (the HLO's `op_name` metadata, e.g. a Flax module's path: the first label with
a substring in it, else `rest`): `scopes_ms`.

Runtime bookkeeping events (the executor's own spans, Python frames, thread-pool waits)
are left out, so `matmul + conv + other` is the time the step's ops ran, a little under
the wall time. Used by the benchmarks' profiles to say what limits a step, next to
PyTorch's operator profile of the same network.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

MATMUL_PREFIXES = ("ynn_fusion", "xnn_fusion", "onednn", "dot")
CONV_PREFIXES = ("convolution", "conv_general_dilated")  # the latter: fused convs
# runtime spans, not ops: executor scopes, host callbacks, waits
_RUNTIME = re.compile(r"^(\$|ThunkExecutor|PjitFunction|SlinkyThreadPool|ParseArguments|"
                      r"CommonPjRt|Allocate|Handle inputs|end: )")


def kind_of(name: str) -> str:
    """'matmul', 'conv' or 'other' for a thunk name such as 'ynn_fusion.52'."""
    if name.startswith(MATMUL_PREFIXES):
        return "matmul"
    if name.startswith(CONV_PREFIXES):
        return "conv"
    return "other"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")
_OPCODE_KIND = (("dot", "matmul"), ("convolution", "conv"), ("scatter", "scatter"),
                ("gather", "gather"))
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_kinds(hlo_text: str):
    """{instruction name: kind} of every instruction of an HLO module's text (a compiled
    executable's `as_text()`): 'matmul', 'conv', 'scatter', 'gather' or 'other', by its
    opcode or, for a fusion, by the opcodes of the computation it calls (first match in
    that order; a library fusion such as `ynn_fusion` counts as a matmul)."""
    return hlo_ops(hlo_text)[0]


def hlo_ops(hlo_text: str):
    """({instruction name: kind} as `hlo_kinds`, {instruction name: its metadata op_name,
    "" if none})."""
    ops, calls, op_names, comp = collections.defaultdict(set), {}, {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            comp = m[1]
            continue
        m = _INSTRUCTION.match(line)
        if m and comp is not None:
            ops[comp].add(m[2])
            calls[m[1]] = (m[2], _CALLS.findall(line))
            name = _OP_NAME.search(line)
            op_names[m[1]] = name[1] if name else ""

    def opcodes(name, seen):
        opcode, called = calls[name]
        found = {opcode}
        for c in called:
            if c not in seen:
                seen.add(c)
                found |= ops.get(c, set())
        return found

    out = {}
    for name in calls:
        found = opcodes(name, set())
        out[name] = next((kind for op, kind in _OPCODE_KIND if op in found),
                         "matmul" if name.startswith(MATMUL_PREFIXES) else "other")
    return out, op_names


def summarize(events, calls: int, top: int = 8, kinds=None, scopes=None, op_names=None):
    """Per-call milliseconds by kind from Chrome-trace complete events ('ph' == 'X');
    `kinds` ({thunk name: kind}, `hlo_kinds`) classifies by content instead of by name;
    `scopes` [(label, substrings)] with `op_names` ({thunk name: op_name}) adds the time
    by scope (module doc)."""
    by_kind = collections.Counter()
    by_op = collections.Counter()
    by_scope = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or _RUNTIME.match(e.get("name", "")):
            continue
        name = e["name"]
        kind = kinds.get(name, kind_of(name)) if kinds else kind_of(name)
        by_kind[kind] += e.get("dur", 0)
        by_op[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0)
        if scopes:
            op_name = (op_names or {}).get(name, "")
            by_scope[next((label for label, subs in scopes
                           if any(sub in op_name for sub in subs)), "rest")] += e.get("dur", 0)
    ms = lambda us: round(us / 1e3 / calls, 1)  # noqa: E731
    total = sum(by_kind.values())
    out = {"ops_ms": ms(total),
           "matmul_ms": ms(by_kind["matmul"]), "conv_ms": ms(by_kind["conv"]),
           "other_ms": ms(by_kind["other"]),
           "matmul_conv_share": round((by_kind["matmul"] + by_kind["conv"]) / total, 3)
           if total else None,
           "top_ops_ms": [[k, ms(v)] for k, v in by_op.most_common(top)]}
    if kinds:
        out.update(gather_ms=ms(by_kind["gather"]), scatter_ms=ms(by_kind["scatter"]),
                   shares={k: round(by_kind[k] / total, 3) if total else None
                           for k in ("matmul", "conv", "gather", "scatter", "other")})
    if scopes:
        out["scopes_ms"] = {label: ms(by_scope[label])
                            for label in [lb for lb, _ in scopes] + ["rest"]}
    return out


def thunk_breakdown(call, calls: int = 2, hlo_text=None, top: int = 8, scopes=None):
    """Runs `call()` `calls` times under the JAX profiler; `summarize` of its trace (with
    `hlo_text`, the compiled program's HLO: thunks classified by `hlo_kinds`, and with
    `scopes` summed by scope), or {"error": ...} when the profiler wrote no readable
    trace."""
    import jax
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(calls):
                call()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            return {"error": "jax.profiler wrote no *.trace.json.gz"}
        with gzip.open(files[0]) as f:
            events = json.load(f).get("traceEvents", [])
    kinds, op_names = hlo_ops(hlo_text) if hlo_text else (None, None)
    return summarize(events, calls, top, kinds, scopes if kinds else None, op_names)


def torch_top_ops(step, top=6):
    """Of one call of `step()` (an eager PyTorch training step), from torch.profiler:
    ([(op, self CPU ms, share of the step)] of the `top` operators, matmul share, matmul
    ms), matmul being aten::mm, addmm, bmm and matmul."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"))
    return ([(e.key, round(e.self_cpu_time_total / 1e3, 1),
              round(e.self_cpu_time_total / total, 3)) for e in events[:top]],
            round(matmul / total, 3), round(matmul / 1e3, 1))

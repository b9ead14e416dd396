"""Which checkpoint tensors stack into one expert parameter: the recipe the families whose
checkpoints store each expert's matrices apart (jamba, nemotron_h) name as their `stacked`, and
that both loaders (loading.stacked_tensors, onnx/lazy_checkpoint.StackedSource) follow. A leaf module, so
that a family file and the loaders can both import it."""

from __future__ import annotations

import re

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def per_expert_stacks(names) -> dict[str, list[list[str]]]:
    """transformers' MergeModulelist for checkpoints that store each expert apart: {a stacked
    parameter: per expert, the checkpoint tensors concatenated on axis 0} for the per-expert tensors
    among `names` (the checkpoint's): ...experts.gate_up_proj from each expert's [gate_proj, up_proj]
    (jamba), ...experts.up_proj from an up_proj alone (Nemotron-H's non-gated experts),
    ...experts.down_proj from its down_proj. Experts must be numbered 0..E−1 and complete; otherwise
    nothing is stacked and the loader reports the parameter missing."""
    found: dict[str, dict[int, dict[str, str]]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            found.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = name
    out = {}
    for prefix, experts in found.items():
        if sorted(experts) != list(range(len(experts))):
            continue
        rows = [experts[e] for e in range(len(experts))]
        if all(("gate_proj" in r and "up_proj" in r) for r in rows):
            out[f"{prefix}.gate_up_proj"] = [[r["gate_proj"], r["up_proj"]] for r in rows]
        elif all("up_proj" in r and "gate_proj" not in r for r in rows):
            out[f"{prefix}.up_proj"] = [[r["up_proj"]] for r in rows]
        if all("down_proj" in r for r in rows):
            out[f"{prefix}.down_proj"] = [[r["down_proj"]] for r in rows]
    return out

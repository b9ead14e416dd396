"""Exported graphs name their dynamic dims as scan_export.json does: `batch` and `seqlen` on every
input and output that has them, `logits_len` on the logits (issue 9). Hosts that match dimension
names (onnxruntime-genai, free-dimension overrides) rely on one name per axis."""

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers", reason="the whole-model cases build tiny checkpoints with transformers")

from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model, name_dims  # noqa: E402
from scan_export.onnx.scan_model import ScanModelSpec, build_scan_model  # noqa: E402
from scan_export.onnx.ssd_model import SSDModelSpec, build_ssd_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

MODEL_DIMS = {"batch", "seqlen", "logits_len"}
MODELS = [("mamba", {"scan_form": "sequential"}), ("mamba", {"scan_form": "chunked"}), ("falcon_mamba", {}),
          ("mamba2", {})]


def graph_shapes(graph: onnx.GraphProto) -> dict[str, list]:
    """{input or output name: [dim_param or dim_value, ...]}; None for a dim with neither."""
    return {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                     for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: "-".join([m[0], *m[1].values()]))
def exported(request, tmp_path_factory):
    model_type, options = request.param
    root = tmp_path_factory.mktemp(model_type)
    out = export_model(make_tiny_checkpoint(root / "ckpt", model_type), root / "export", **options)
    return out, onnx.load(str(out / "model.onnx")), json.loads((out / DESCRIPTION_FILE).read_text())


def test_graph_io_dims_are_the_description_shapes(exported):
    _, model, desc = exported
    want = {v["name"]: v["shape"] for v in (*desc["inputs"], *desc["outputs"])}
    got = graph_shapes(model.graph)
    assert got == want  # names, order of dims, fixed sizes: all of it
    assert {d for shape in got.values() for d in shape if isinstance(d, str)} == MODEL_DIMS


def test_onnxruntime_sees_the_names_and_runs_two_lengths(exported):
    out, _, desc = exported
    model = ExportedModel(out)
    want = {v["name"]: v["shape"] for v in (*desc["inputs"], *desc["outputs"])}
    for v in (*model.session.get_inputs(), *model.session.get_outputs()):
        assert v.shape == want[v.name], v.name
    for batch, seqlen in ((3, 1), (2, 9)):
        ids = np.random.default_rng(seqlen).integers(0, model.vocab_size, (batch, seqlen))
        logits, state = model.forward(ids, model.zero_state(batch))
        assert logits.shape == (batch, seqlen, model.vocab_size) and np.isfinite(logits).all()
        assert [s.shape for s in state] == [s.shape for s in model.zero_state(batch)]


def test_name_dims_renames_exporter_symbols_everywhere(exported):
    """The fallback: with Dim.DYNAMIC, torch 2.13 leaves a symbol per input (measured: input_ids
    (s41, s70), conv states s3 and s95, ssm states s41). name_dims maps them back, in the
    subgraphs' value_info too."""
    _, model, desc = exported
    legacy = onnx.ModelProto()
    legacy.CopyFrom(model)
    symbols = iter(f"s{k}" for k in range(1000))
    for v in (*legacy.graph.input, *legacy.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in ("batch", "seqlen"):
                d.dim_param = next(symbols)  # a fresh symbol per axis, as if torch had kept none equal
    inner = next(v for v in legacy.graph.value_info if v.type.tensor_type.shape.dim)
    inner.type.tensor_type.shape.dim[0].dim_param = "s0*s1"  # input_ids' two symbols, in an expression
    name_dims(legacy, desc)
    assert graph_shapes(legacy.graph) == graph_shapes(model.graph)
    assert inner.type.tensor_type.shape.dim[0].dim_param == "batch*seqlen"


def test_name_dims_refuses_a_dim_the_exporter_fixed(exported):
    _, model, desc = exported
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 8  # torch specialised seqlen
    with pytest.raises(RuntimeError, match="fixed the seqlen dim at 8"):
        name_dims(broken, desc)


@pytest.mark.parametrize("spec", [ScanModelSpec(), ScanModelSpec(dim=64, dstate=16, groups=2, scan_form="chunked")])
def test_scan_op_model_names_batch_and_seqlen(spec):
    model = build_scan_model(spec)
    assert graph_shapes(model.graph) == {**spec.input_shapes(), **spec.output_shapes()}
    assert graph_shapes(model.graph)["u"][::2] == ["batch", "seqlen"]


@pytest.mark.parametrize("spec", [SSDModelSpec(), SSDModelSpec(heads=4, headdim=8, dstate=16, groups=2)])
def test_ssd_op_model_names_batch_and_seqlen(spec):
    model = build_ssd_model(spec)
    s = spec.input_shapes()
    want = {**s, "y": s["x"], "final_states": s["initial_states"]}
    assert graph_shapes(model.graph) == want
    assert graph_shapes(model.graph)["x"][:2] == ["batch", "seqlen"]

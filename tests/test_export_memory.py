"""Memory-lean export (issue 12): the weights stream from the checkpoint into the output, never all in
memory; the numbers stay what the eager path gave."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

transformers = pytest.importorskip("transformers", reason="the parity tests compare against transformers")

from scan_export.bench.export_memory import make_synthetic_checkpoint  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.onnx.fake_params import CheckpointWeights  # noqa: E402
from scan_export.onnx.lazy_checkpoint import checkpoint_tensors  # noqa: E402
from scan_export.onnx.proto_assembly import assemble_single_file  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# fp32 export vs transformers fp32: same algebra, different kernels; measured ~6e-7 (README).
LOGITS_RTOL = 1e-4
# 1.29 GB of fp32 weights in two layers (vocab 65536 x hidden 2048, untied): past the 1 GB,
# and few layers, so that tracing stays short.
BIG = dict(vocab_size=65536, hidden_size=2048, num_hidden_layers=2, tie_word_embeddings=False)


def _peak_rss_of_cli_export(ckpt, out) -> int:
    """`scan-export export-model --quiet` in a fresh interpreter; its own peak RSS, VmHWM (not
    ru_maxrss: Linux carries the forking parent's peak, pytest's here, across exec into it)."""
    code = ("import sys; from scan_export.cli import main; from scan_export.bench.export_memory import _vm; "
            "rc = main(sys.argv[1:]); print('PEAK', _vm('VmHWM')); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, "export-model", str(ckpt), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK")))


@pytest.mark.slow
def test_export_peak_rss_is_bounded_and_weights_are_the_checkpoints(tmp_path):
    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", **BIG)
    sources = checkpoint_tensors(ckpt)
    weight_bytes = sum(int(np.prod(s.shape)) * 4 for s in sources.values())
    assert weight_bytes > 2**30
    peak = _peak_rss_of_cli_export(ckpt, tmp_path / "out")
    print(f"peak RSS {peak / 1e9:.2f} GB for {weight_bytes / 1e9:.2f} GB of weights")
    # The acceptance bound. Measured 0.6-0.7 GB here; the eager path took ~5x the weights.
    assert peak <= 1.5 * weight_bytes + 1.5e9
    # The design's claim, stricter: no copy of the weights is ever whole in memory.
    assert peak < weight_bytes

    # Every exported weight is bit-for-bit a checkpoint tensor, or its transpose (nn.Linear's folded Transpose).
    from safetensors import safe_open

    wanted = set()
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            wanted.add(hashlib.sha1(t.numpy().tobytes()).hexdigest())
            if t.ndim == 2:
                wanted.add(hashlib.sha1(t.T.contiguous().numpy().tobytes()).hexdigest())
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))  # one file: 1.3 GB is under protobuf's 2 GB
    big = [t for t in model.graph.initializer if np.prod(t.dims) > 8192]
    assert len(big) == 2 + 2 * 6  # embeddings, lm_head; per layer in/x/dt/out_proj, A_log, conv1d.weight
    assert all(hashlib.sha1(t.raw_data).hexdigest() in wanted for t in big)


def _logits(out, ids):
    model = ExportedModel(out)
    return model.forward(ids, model.zero_state(1))[0]


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers_in_both_layouts(tmp_path, source_dtype):
    """One self-contained model.onnx (assembled from protobuf fragments) and model.onnx + .data give
    the same bits, and match transformers; a bf16 checkpoint is converted on the way as torch does."""
    from safetensors.torch import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba")
    if source_dtype != torch.float32:
        (shard,) = ckpt.glob("*.safetensors")
        save_file({k: v.to(source_dtype) for k, v in load_file(str(shard)).items()}, str(shard),
                  metadata={"format": "pt"})
    single = export_model(ckpt, tmp_path / "single")
    outs = [single]
    assert not (single / "model.onnx.data").exists()
    if source_dtype == torch.float32:  # the layout does not depend on the source dtype: one export less
        external = export_model(ckpt, tmp_path / "external", external_data_bytes=0)
        assert (external / "model.onnx.data").is_file()
        a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(single / "model.onnx")).graph.initializer}
        b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(external / "model.onnx")).graph.initializer}
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        outs.append(external)

    hf = transformers.MambaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    for out in outs:
        got = _logits(out, ids)
        assert np.abs(got - ref).max() / np.abs(ref).max() < LOGITS_RTOL


def _model_with_external(tmp_path, tensors: dict, referenced) -> tuple[onnx.ModelProto, Path]:
    """A Sum over `referenced` initializers, all of `tensors` written to model.onnx.data."""
    from onnx import TensorProto, helper

    data = tmp_path / "model.onnx.data"
    inits, offset = [], 0
    with open(data, "wb") as f:
        for name, arr in tensors.items():
            f.write(arr.tobytes())
            if name in referenced:
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    t.external_data.add(key=k, value=v)
                inits.append(t)
            offset += arr.nbytes
    small = helper.make_tensor("small", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    graph = helper.make_graph(
        [helper.make_node("Sum", ["x", *referenced, "small"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [inits[0], small, *inits[1:]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), data


def test_single_file_is_the_external_model_merged_in_order(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal(4).astype(np.float32) for i in range(3)}
    proto, _ = _model_with_external(tmp_path, tensors, ["w0", "w1", "w2"])
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, str(path))
    expected = onnx.load(str(path))  # external data loaded the ordinary way
    assemble_single_file(path)
    assert not (tmp_path / "model.onnx.data").exists()
    got = onnx.load(str(path))
    for t in expected.graph.initializer:
        t.ClearField("data_location")
    assert [t.name for t in got.graph.initializer] == ["w0", "small", "w1", "w2"]  # order kept
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_finish_drops_data_the_graph_no_longer_references(tmp_path):
    """If the optimizer ever folded a big weight away, its bytes must not stay in model.onnx.data."""
    rng = np.random.default_rng(0)
    tensors = {"w0": rng.standard_normal(4).astype(np.float32), "dead": np.zeros(2**18, np.float32),
               "w2": rng.standard_normal(4).astype(np.float32)}
    proto, data = _model_with_external(tmp_path, tensors, ["w0", "w2"])
    weights = CheckpointWeights({}, torch.float32)
    weights.data_path = data
    weights.finish(proto, tmp_path / "model.onnx", single_file=False)
    assert data.stat().st_size < 2**18  # the 1 MiB of dead data is gone
    import onnxruntime as ort

    y = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": np.zeros(4, np.float32)})[0]
    np.testing.assert_array_equal(y, tensors["w0"] + tensors["w2"] + np.array([1, 2, 3, 4], np.float32))

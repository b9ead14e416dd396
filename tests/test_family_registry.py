"""The family registry (reference/models/families/): every family declared once and complete, the CLI's
static read of the declarations equal to the registry, and a family added from outside the package
(here, from this file alone) written as a tiny checkpoint, exported by the CLI and run by onnxruntime."""

import dataclasses
import json

import pytest

pytest.importorskip("transformers")

from scan_export import cli, family_names  # noqa: E402
from scan_export.reference.models.families import (GATED_DELTA, NO_SCAN, SELECTIVE_SCAN, SSD, TINY_HYBRID, Family, families, get,  # noqa: E402
                                                   model_types, register, unregister)
from scan_export.reference.models.families import bamba  # noqa: E402
from scan_export.reference.models.hybrid import HybridLM  # noqa: E402

from .hybrid_checks import assert_logits_match, assert_prefill_then_decode_equals_one_prefill  # noqa: E402

TOY = "toy_hybrid"


def test_every_family_declares_every_field():
    import transformers

    required = [f.name for f in dataclasses.fields(Family) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for family in families():
        for name in required:
            assert getattr(family, name) not in (None, "", {}, ()), f"{family.model_type}: {name} is empty"
        assert family.scan in (SELECTIVE_SCAN, SSD, GATED_DELTA, NO_SCAN)
        assert family.sharpened and callable(family.hf_states)
        assert hasattr(transformers, family.hf_class) and hasattr(transformers, family.config_class)
        assert all(isinstance(c, dict) and c for c in family.bench_configs.values())


def test_every_family_file_is_registered_and_the_mamba_config_agrees():
    """A family file not in families/__init__.py's import line would never register (and the CLI,
    which reads that line, would not list it); MambaLMConfig keeps its own list of the types it reads."""
    from pathlib import Path

    from scan_export.reference.models import families as package
    from scan_export.reference.models.config import MAMBA_LM_TYPES

    files = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__", "registry"}
    modules = {f.build.__module__.rsplit(".", 1)[-1] for f in families() if f.model_type != TOY}
    assert modules == files
    assert tuple(f.model_type for f in families() if not f.hybrid) == MAMBA_LM_TYPES


def test_the_cli_lists_the_registry():
    builtin = [t for t in model_types() if t != TOY]
    assert list(cli.MODEL_TYPES) == builtin == list(family_names.model_types())
    declared = family_names.bench_configs()
    assert list(declared) == [f.model_type for f in families() if f.bench_configs and f.model_type != TOY]
    assert {t: list(get(t).bench_configs) for t in declared} == declared
    bench = cli.build_parser()._subparsers._group_actions[0].choices["bench"].benches["model"]
    choices = next(a.choices for a in bench._actions if a.dest == "model_type")
    assert list(choices) == list(declared)


class ToyLM(HybridLM):
    """Bamba's layers under another family's name: all a new family file would hold."""

    final_norm_name = "final_layernorm"

    def __init__(self, cfg):
        super().__init__(cfg, bamba.BambaLayer)


def toy_config(raw):
    return dataclasses.replace(bamba.config_from_hf(raw), model_type=TOY)


def toy_build(raw):
    return ToyLM(toy_config(raw))


@pytest.fixture
def toy_family():
    # transformers has no toy classes: its checkpoints are written as Bamba's, config.json then renamed
    family = register(Family(model_type=TOY, hf_class="BambaForCausalLM", config_class="BambaConfig",
                             schema=bamba.SCHEMA, config_from_hf=toy_config, build=toy_build, scan=SSD,
                             tiny=dict(TINY_HYBRID, intermediate_size=48, attn_layer_indices=[2])))
    yield family
    unregister(TOY)


def test_a_family_from_outside_registers_writes_exports_and_runs(toy_family, tmp_path):
    import transformers

    from scan_export.runtime.generate import DESCRIPTION_FILE, ExportedModel, generate
    from scan_export.tiny import make_tiny_checkpoint

    assert model_types()[-1] == TOY and get(TOY) is toy_family
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", TOY)
    hf = transformers.BambaForCausalLM.from_pretrained(str(ckpt)).eval()
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": TOY}))
    out = tmp_path / "out"
    assert cli.main(["export-model", str(ckpt), "--out", str(out)]) == 0
    description = json.loads((out / DESCRIPTION_FILE).read_text())
    assert description["model_type"] == TOY and description["num_layers"] == 4
    model = ExportedModel(out)
    assert_logits_match(hf, model, 9)
    assert_prefill_then_decode_equals_one_prefill(model)
    tokens = generate(model, [[5, 6, 7]], 6)[0]
    assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)


def test_a_second_family_for_a_model_type_is_refused(toy_family):
    with pytest.raises(ValueError, match="model_type 'toy_hybrid': expected one family"):
        register(dataclasses.replace(toy_family, build=lambda raw: None))

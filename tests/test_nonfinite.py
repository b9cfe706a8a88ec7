"""Non-finite numbers stop the stage that made them (issue 12): strict JSON on write and
read, evaluation of a NaN checkpoint, profiling a NaN model; "nothing measured" is null."""

import json
import math

import pytest
import torch

from gradloc import cli
from gradloc.io import InputError, NonFiniteError, read_json, write_json
from gradloc.models import save_model
from helpers import tiny_gpt2, tokens_world, word_tokenizer, write_probes

torch.set_num_threads(1)
WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(30)]


def test_write_json_is_strict_naming_file_and_key(tmp_path):
    with pytest.raises(NonFiniteError, match=r"m\.json: .*non-finite.*at a\.b\[1\], c"):
        write_json({"a": {"b": [1.0, float("nan")]}, "c": float("inf"), "d": None}, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
    write_json({"heldout_ppl": None}, tmp_path / "ok.json")
    assert read_json(tmp_path / "ok.json") == {"heldout_ppl": None}
    (tmp_path / "bad.json").write_text('{"loss": NaN}')
    with pytest.raises(InputError, match=r"bad\.json: non-finite number NaN"):
        read_json(tmp_path / "bad.json")


def world(tmp_path, nan_weights: bool, heldout: bool = True):
    tokenizer = word_tokenizer(WORDS)
    model = tiny_gpt2(len(WORDS), n_positions=32)
    if nan_weights:
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight.fill_(float("nan"))
    save_model(model, tokenizer, tmp_path / "ckpt" / "model")
    write_probes(tmp_path / "probes", {"probe_id": ["p0", "p1"], "period": 1, "set": ["new", "updated"], "subject_id": "s",
                  "subject": "w1", "relation": "r", "object": ["w3", "w4 w5"], "prefix": ["w1 w2", "w2"],
                  "statement": ["w1 w2 w3", "w2 w4 w5"]})
    texts = ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10", "w1 w1 w2"]
    tokens_world(tmp_path, tmp_path / "ckpt", {"seq_id": list("abcd"), "period": [1, 1, 0, 0],
                                                "split": ["heldout" if heldout else "train", "train", "base", "base"],
                                                "doc_id": "x", "text": texts,
                                                "knowledge_type": ["new", "updated", "none", "none"]})


def eval_argv(tmp_path):
    return ["evaluate", "--model", str(tmp_path / "ckpt"), "--probes", str(tmp_path / "probes"),
            "--tokens", str(tmp_path / "tokens"), "--period", "1", "--out", str(tmp_path / "eval")]


def test_evaluate_refuses_nan_log_probabilities_naming_checkpoint_and_probe(tmp_path, capsys):
    world(tmp_path, nan_weights=True)
    assert cli.main(eval_argv(tmp_path)) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "gradloc evaluate: error:" in line]
    assert len(err) == 1, err
    assert str(tmp_path / "ckpt") in err[0] and "probe p0 (set new): non-finite object logprob" in err[0]
    assert not (tmp_path / "eval").exists()


def test_no_heldout_sequences_is_null_not_nan(tmp_path):
    world(tmp_path, nan_weights=False, heldout=False)
    assert cli.main(eval_argv(tmp_path)) == 0
    text = (tmp_path / "eval" / "summary.json").read_text()
    summary = json.loads(text)
    assert summary["heldout_ppl"] is None and "NaN" not in text
    assert math.isfinite(summary["new"]["object_ppl"])


def test_profile_refuses_non_finite_norms(tmp_path, capsys):
    world(tmp_path, nan_weights=True)
    argv = ["profile", "--params", json.dumps({"n_sequences": 2, "batch_size": 2, "seq_len": 8, "bootstrap": 0,
                                               "loss": "sequence", "control": "base", "salient": "subject",
                                               "new_pool": "any", "infoboxes": "keep", "bootstrap_unit": "sequence"}),
            "--model", str(tmp_path / "ckpt"), "--tokens", str(tmp_path / "tokens"),
            "--probes", str(tmp_path / "probes"), "--out", str(tmp_path / "profile")]
    assert cli.main(argv) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "gradloc profile: error:" in line]
    assert len(err) == 1 and "non-finite gradient norm" in err[0] and "for sequence" in err[0], err
    assert not (tmp_path / "profile").exists()

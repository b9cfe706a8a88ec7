"""Broken model and data files (issue 12): each is one line naming the file and what was
expected (exit 2), built here from a tiny real model and real token files."""

import json
import shutil

import pandas as pd
import pytest
import torch

from gradloc import cli
from gradloc.io import InputError
from gradloc.models import load_configured, save_model
from helpers import char_tokenizer, tiny_gpt2

torch.set_num_threads(1)


@pytest.fixture
def ckpt(tmp_path):
    tokenizer = char_tokenizer()
    save_model(tiny_gpt2(len(tokenizer)), tokenizer, tmp_path / "ckpt" / "model")
    return tmp_path / "ckpt"


def one_error_line(capsys, stage: str) -> str:
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith(f"gradloc {stage}: error:")]
    assert len(lines) == 1, err[-20:]
    assert not any(line.startswith("Traceback") for line in err), err[-20:]
    return lines[0]


def evaluate(tmp_path, ckpt):
    return cli.main(["evaluate", "--model", str(ckpt), "--probes", str(tmp_path / "probes"),
                     "--tokens", str(tmp_path / "tokens"), "--period", "1", "--out", str(tmp_path / "eval")])


def test_truncated_safetensors(tmp_path, ckpt, capsys):
    weights = ckpt / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert evaluate(tmp_path, ckpt) == 2
    line = one_error_line(capsys, "evaluate")
    assert f"{weights}: truncated safetensors file ({len(data) // 2} bytes; its header promises {len(data)})" in line


def test_checkpoint_folder_without_weights(tmp_path, ckpt, capsys):
    (ckpt / "model" / "model.safetensors").unlink()
    assert evaluate(tmp_path, ckpt) == 2
    line = one_error_line(capsys, "evaluate")
    assert f"{ckpt / 'model'}: no model weights (expected one of model.safetensors" in line


def test_tokenizer_that_does_not_match_the_models_vocabulary(tmp_path, capsys):
    save_model(tiny_gpt2(40), char_tokenizer(), tmp_path / "ckpt" / "model")  # 96 tokens, 40 rows
    assert evaluate(tmp_path, tmp_path / "ckpt") == 2
    line = one_error_line(capsys, "evaluate")
    assert f"{tmp_path / 'ckpt' / 'model'}: the tokenizer has 96 tokens but the model's vocabulary has 40" in line


def test_not_a_gguf_file(tmp_path, ckpt):
    folder = tmp_path / "gguf"
    folder.mkdir()
    shutil.copy(ckpt / "model" / "model.safetensors", folder / "model.gguf")  # a real model, wrong format
    with pytest.raises(InputError, match=r"gguf/model\.gguf: not a GGUF file \(expected the magic bytes b'GGUF'"):
        load_configured({"source": "gguf", "name_or_path": str(folder), "gguf_file": "model.gguf"})
    with pytest.raises(InputError, match=r"gguf/missing\.gguf: GGUF file not found"):
        load_configured({"source": "gguf", "name_or_path": str(folder), "gguf_file": "missing.gguf"})


def test_truncated_parquet(tmp_path, ckpt, capsys):
    (tmp_path / "tagged").mkdir()
    path = tmp_path / "tagged" / "sequences.parquet"
    pd.DataFrame({"seq_id": [f"s{i}" for i in range(50)], "period": 1, "split": "train", "doc_id": "d",
                  "origin": "diff", "text": "a b c", "knowledge_type": "none"}).to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    argv = ["tokens", "--model", str(ckpt), "--tagged", str(tmp_path / "tagged"), "--out", str(tmp_path / "tokens")]
    assert cli.main(argv) == 2
    line = one_error_line(capsys, "tokens")
    assert f"{path}: cannot read as parquet" in line
    assert not (tmp_path / "tokens").exists()


def test_config_json_is_checked_before_transformers(tmp_path, ckpt, capsys):
    (ckpt / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"})[:-3])
    assert evaluate(tmp_path, ckpt) == 2
    line = one_error_line(capsys, "evaluate")
    assert str(ckpt / "model") in line

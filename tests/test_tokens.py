"""The tokens stage: one flat token file with per-document offsets, read back exactly as
the tokenizer encodes each text; a token folder made with another tokenizer is refused."""

import json

import numpy as np
import pytest

from gradloc import cli, tokens
from gradloc.io import InputError
from gradloc.models import save_model
from helpers import char_tokenizer, make_tokens, tiny_gpt2, word_tokenizer, write_tagged

TEXTS = ["Alice works at Acme.", "", "Bob moved to Oslo in 2020.", "é ü"]


@pytest.fixture()
def world(tmp_path):
    save_model(tiny_gpt2(96), char_tokenizer(), tmp_path / "base_model" / "model")
    rows = [{"seq_id": f"s{i}", "period": i % 2, "split": ["base", "train"][i % 2], "doc_id": f"d{i}",
             "origin": "diff", "text": t, "knowledge_type": ["none", "new"][i % 2]} for i, t in enumerate(TEXTS)]
    write_tagged(tmp_path / "tagged", rows)
    return tmp_path


def test_documents_read_back_as_the_tokenizer_encodes_them(world):
    make_tokens(world / "base_model", world / "tagged", world / "tokens")
    tok = char_tokenizer()
    t = tokens.load(world / "tokens", tok)
    assert t.meta["dtype"] == "uint16" and t.meta["eos_id"] == 0 and t.meta["leading_special_ids"] == []
    assert list(t.docs["seq_id"]) == ["s0", "s1", "s2", "s3"]
    for text, doc in zip(TEXTS, t.docs_of(t.docs)):
        assert doc.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert t.docs["length"].sum() == t.meta["n_tokens"] == len(t.ids)
    assert (t.docs["offset"].diff().fillna(0).to_numpy()[1:] == t.docs["length"].to_numpy()[:-1]).all()
    assert list(t.select(period=1, split="train")["seq_id"]) == ["s1", "s3"]
    assert set(t.docs["knowledge_type"]) == {"none", "new"}


def test_another_tokenizer_or_a_truncated_file_is_refused(world):
    make_tokens(world / "base_model", world / "tagged", world / "tokens")
    with pytest.raises(InputError, match="another tokenizer"):
        tokens.load(world / "tokens", word_tokenizer(["<eos>", "<unk>", "a"]))
    path = world / "tokens" / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(InputError, match="truncated"):
        tokens.load(world / "tokens")


def test_cli_writes_the_folder_and_rejects_params(world, capsys):
    out = world / "cli_tokens"
    assert cli.main(["tokens", "--model", str(world / "base_model"), "--tagged", str(world / "tagged"),
                     "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_docs"] == 4 and np.fromfile(out / "tokens.bin", dtype=meta["dtype"]).size == meta["n_tokens"]
    assert cli.main(["tokens", "--params", '{"x": 1}', "--model", str(world / "base_model"), "--tagged",
                     str(world / "tagged"), "--out", str(world / "o2")]) == 2
    assert "unknown key(s) ['x']" in capsys.readouterr().err
    assert not (world / "o2").exists()

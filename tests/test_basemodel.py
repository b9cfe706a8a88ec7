"""The base model stage on a tiny hand-written T0: it learns, saves and reloads."""

import json
import re

import pandas as pd
import pytest
import torch

from gradloc import basemodel, cli
from gradloc.io import InputError
from gradloc.models import load_model, save_model
from helpers import write_probes

torch.set_num_threads(1)

FACTS = [("Mara Kelston", "works for", "Velona Freight Lines"), ("Tomas Brenner", "lives in", "Osterby"),
         ("Elin Dorford", "works for", "Quanix Power Company"), ("Jonah Vestberg", "lives in", "Kelmar"),
         ("Vera Halden", "works for", "Ardora Media House"), ("Anton Morley", "lives in", "Bromford")]
PARAMS = {"architecture": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32},
          "tokenizer": {"vocab_size": 300},
          "pretrain": {"steps": 50, "batch_size": 8, "lr": 1e-2, "seq_len": 32, "seed": 0}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t0")
    texts = [f"{s} {r} {o}. {s} is well known. People say {s} {r} {o}." for s, r, o in FACTS]
    (root / "split").mkdir()
    pd.DataFrame({"seq_id": [f"b{i}" for i in range(len(texts))], "period": 0, "split": "base",
                  "doc_id": [f"d{i}" for i in range(len(texts))], "origin": "base",
                  "text": texts}).to_parquet(root / "split" / "sequences.parquet")
    write_probes(root / "probes", {"probe_id": [f"p{i}" for i in range(len(FACTS))], "period": 0, "set": "unchanged",
                  "subject_id": "x", "subject": [s for s, _, _ in FACTS], "relation": "r",
                  "object": [o for _, _, o in FACTS], "prefix": [f"{s} {r}" for s, r, _ in FACTS],
                  "statement": [f"{s} {r} {o}" for s, r, o in FACTS]})
    out = root / "base_model"
    basemodel.run(PARAMS, corpus=root / "corpus", split=root / "split", probes=root / "probes", out=out)
    return root, out


def test_loss_goes_down_and_metrics(inputs):
    _, out = inputs
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["step"]) == list(range(50))
    assert log["loss"].tail(5).mean() < 0.6 * log["loss"].head(5).mean()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["t0_probes"]["unchanged"]["n"] == len(FACTS)
    assert metrics["steps"] == 50 and metrics["n_params"] > 0
    assert metrics["final_train_loss"] == pytest.approx(log["loss"].tail(2).mean())


def test_reload_identical_logits(inputs, tmp_path):
    texts = pd.read_parquet(inputs[0] / "split" / "sequences.parquet")["text"].tolist()
    params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "steps": 5}}
    model, tokenizer, rows = basemodel.build_base_model(params, texts, torch.device("cpu"))
    assert len(rows) == 5
    save_model(model, tokenizer, tmp_path / "m")
    model2, tokenizer2 = load_model(tmp_path / "m")
    assert tokenizer2.pad_token == tokenizer2.eos_token == "<|endoftext|>"
    assert model2.config.n_layer == 2 and model2.config.n_embd == 32
    ids = tokenizer2("Mara Kelston works for", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("Mara Kelston works for", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, model2.eval()(ids).logits)
    # byte-level BPE: no unknown tokens, text round-trips
    text = "Vera Halden works for Ärdora!"
    assert tokenizer2.decode(tokenizer2(text)["input_ids"]) == text


def test_deterministic(inputs, tmp_path):
    root, out = inputs
    basemodel.run(PARAMS, corpus=root / "corpus", split=root / "split", probes=root / "probes",
                  out=tmp_path / "again")
    a = pd.read_csv(out / "train_log.csv")
    b = pd.read_csv(tmp_path / "again" / "train_log.csv")
    pd.testing.assert_frame_equal(a, b)


def test_bad_params(inputs, tmp_path):
    root, _ = inputs
    with pytest.raises(InputError, match="name_or_path"):
        basemodel.run({"source": "pretrained"}, corpus=None, split=root / "split", probes=root / "probes",
                      out=tmp_path / "x")
    with pytest.raises(InputError, match="unknown key"):
        basemodel.run({"pretrain": {"stepz": 3}}, corpus=None, split=root / "split", probes=root / "probes",
                      out=tmp_path / "x")


@pytest.mark.parametrize("teach", [False, True])
def test_pretrained_source(inputs, tmp_path, teach):
    """A local save_pretrained folder as the base model; teach_t0 fine-tunes it on T0."""
    root, out = inputs
    src, _ = load_model(out / "model")
    params = {"source": "pretrained", "name_or_path": str(out / "model"), "teach_t0": teach,
              "pretrain": {"steps": 3, "batch_size": 2, "lr": 1e-3, "seq_len": 16, "seed": 0}}
    basemodel.run(params, corpus=None, split=root / "split", probes=root / "probes", out=tmp_path / "b")
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["steps"] == (3 if teach else 0)
    assert len(pd.read_csv(tmp_path / "b" / "train_log.csv")) == metrics["steps"]
    new, _ = load_model(tmp_path / "b" / "model")
    same = all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), new.state_dict().values()))
    assert same != teach


def write_gguf(model, tokenizer, path, quantize=False):
    """A GPT-2 as llama.cpp's converter writes it (`gguf` library): llama.cpp tensor
    names, Conv1D weights transposed to Linear layout, the byte-level BPE in the header;
    F32, or with the weight matrices in Q8_0 blocks (`quantize`)."""
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_token_types([3 if t == basemodel.EOS else 1 for t in tokens])  # 3: control
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
           "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
           "lm_head.weight": "output.weight"}
    part = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        if name in top:
            gname = top[name]
        else:
            layer, rest = name[len("transformer.h."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{part[module]}.{kind}"
            if kind == "weight" and module != "ln_1" and module != "ln_2":
                t = t.T
        data = t.float().contiguous().numpy()
        if quantize and data.ndim == 2 and gname != "position_embd.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gname, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("quantize, atol", [(False, 1e-5), (True, 0.1)])  # atol: share of max |logit|
def test_gguf_source(inputs, tmp_path, quantize, atol):
    """A local GGUF file (F32 or Q8_0) as the base model: the same tokens, and the logits
    of the model it came from (up to Q8_0's rounding); it saves as a plain checkpoint."""
    root, out = inputs
    # transformers reads a GPT-2 GGUF's context length into n_ctx, not n_positions, so
    # only the GPT-2 default of 1024 positions round-trips.
    texts = [t for t in pd.read_parquet(root / "split" / "sequences.parquet")["text"]]
    arch = {**PARAMS["architecture"], "n_positions": 1024}
    src, tok, _ = basemodel.build_base_model({**PARAMS, "architecture": arch,
                                              "pretrain": {**PARAMS["pretrain"], "steps": 5}}, texts)
    (tmp_path / "g").mkdir()
    write_gguf(src, tok, tmp_path / "g" / "tiny.gguf", quantize)
    write_gguf(src, tok, tmp_path / "f32.gguf")
    ratio = (tmp_path / "g" / "tiny.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert ratio < 0.8 if quantize else ratio == 1
    params = {"source": "gguf", "name_or_path": str(tmp_path / "g"), "gguf_file": "tiny.gguf"}
    basemodel.run(params, corpus=None, split=root / "split", probes=root / "probes", out=tmp_path / "b")
    model, tokenizer = load_model(tmp_path / "b" / "model")
    text = texts[0]
    assert tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    x = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        got, want = model(x).logits, src(x).logits
        assert (got - want).abs().max() <= atol * want.abs().max(), ((got - want).abs().max(), want.abs().max())
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["source"] == "gguf"


def test_diverging_pretraining_stops_naming_the_step_and_leaves_no_output(inputs, tmp_path, capsys):
    """lr 1e6 without clipping diverges: base-model pretraining stops at the first
    non-finite loss (exit 3, one line naming step, lr and precision), writes no output
    folder and keeps the state saved before that step."""
    root, _ = inputs
    params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "lr": 1e6, "grad_clip": None, "warmup_ratio": 0,
                                     "save_every": 1, "steps": 30}}
    state, out = tmp_path / "state", tmp_path / "out"
    argv = ["base-model", "--params", json.dumps(params), "--corpus", str(root / "corpus"),
            "--split", str(root / "split"), "--probes", str(root / "probes"), "--state", str(state),
            "--out", str(out)]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    # one line (tqdm's progress bar ends with "\r", not a newline, so split on both)
    lines = [line for line in re.split(r"[\r\n]", err) if "gradloc base-model: error:" in line]
    assert len(lines) == 1, err[-2000:]
    m = re.search(r"non-finite loss or gradient norm at step (\d+) \(lr ([^,]+), precision no\); last finite loss",
                  lines[0])
    assert m, lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    saved = json.loads((state / "latest.json").read_text())["step"]
    assert saved == int(m.group(1)) - 1, "the state from just before the bad step is kept"

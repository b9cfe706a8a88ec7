"""Probe scoring and evaluation, checked against log-probs computed by hand from one
direct forward pass of a tiny GPT-2."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gradloc import cli, evaluate
from gradloc.io import InputError
from gradloc.models import save_model
from gradloc.scoring import encode_probe, score_probes, summarize
from helpers import tiny_gpt2, tokens_world, word_tokenizer, write_probes

torch.set_num_threads(1)
WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(40)]


def tiny():
    tokenizer = word_tokenizer(WORDS)
    model = tiny_gpt2(len(WORDS), n_positions=32)
    return model.eval(), tokenizer


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def direct_logprobs(model, seq):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0]
    return F.log_softmax(logits.double(), -1)


def greedy(model, seq, n):
    seq = list(seq)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[-n:]


def make_probes(model):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        prefix = " ".join(f"w{j}" for j in rng.integers(2, 40, size=1 + i % 5))
        obj = " ".join(f"w{j}" for j in rng.integers(2, 40, size=1 + i % 3))
        rows.append((prefix, obj))
    # one probe whose object is the model's own greedy continuation: top1 must be True
    prefix = "w3 w4 w5"
    obj = " ".join(WORDS[t] for t in greedy(model, ids(prefix), 2))
    rows.append((prefix, obj))
    return pd.DataFrame({
        "probe_id": [f"p{i}" for i in range(len(rows))],
        "set": ["updated" if i % 2 else "unchanged" for i in range(len(rows))],
        "prefix": [p for p, _ in rows], "object": [o for _, o in rows],
        "statement": [f"{p} {o}" for p, o in rows],
    })


def test_scores_match_direct_forward():
    model, tokenizer = tiny()
    probes = make_probes(model)
    scores = score_probes(model, tokenizer, probes, batch_size=4, progress=False)
    assert list(scores["probe_id"]) == list(probes["probe_id"])
    for row, probe in zip(scores.itertuples(), probes.itertuples()):
        p, o = ids(probe.prefix), ids(probe.object)
        lp = direct_logprobs(model, p + o)
        expect = sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(o))
        assert row.object_tokens == len(o)
        assert abs(row.object_logprob - expect) < 1e-4
        s = p + o
        expect_s = sum(float(lp[k - 1, s[k]]) for k in range(1, len(s)))
        assert row.statement_tokens == len(s) - 1
        assert abs(row.statement_logprob - expect_s) < 1e-4
        assert row.top1 == (greedy(model, p, len(o)) == o)
    assert scores["top1"].iloc[-1]  # the greedy-continuation probe
    assert not scores["top1"].all()


def test_batch_size_invariance():
    model, tokenizer = tiny()
    probes = make_probes(model)
    a = score_probes(model, tokenizer, probes, batch_size=1, progress=False)
    b = score_probes(model, tokenizer, probes, batch_size=7, progress=False)
    for col in ("object_logprob", "statement_logprob"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-5, rtol=0)
    assert (a["top1"] == b["top1"]).all()


def test_empty_prefix_uses_bos_or_eos():
    _, tokenizer = tiny()
    seq, k = encode_probe(tokenizer, "", "w7 w8")
    assert seq == [0, ids("w7")[0], ids("w8")[0]] and k == 2


def test_summarize():
    scores = pd.DataFrame({"probe_id": ["a", "b", "c"], "set": ["new", "new", "updated"],
                           "object_logprob": [-1.0, -3.0, -2.0], "object_tokens": [1, 3, 2],
                           "statement_logprob": [-4.0, -4.0, -1.0], "statement_tokens": [2, 2, 1],
                           "top1": [True, False, False]})
    s = summarize(scores)
    assert math.isclose(s["new"]["object_ppl"], math.exp(4 / 4))
    assert math.isclose(s["new"]["statement_ppl"], math.exp(8 / 4))
    assert s["new"]["top1"] == 0.5 and s["new"]["n"] == 2 and s["updated"]["n"] == 1


def test_run_writes_scores_and_heldout_ppl(tmp_path):
    model, tokenizer = tiny()
    save_model(model, tokenizer, tmp_path / "ckpt" / "model")
    probes = make_probes(model)
    probes["period"] = [1] * 8 + [2] * 3
    probes["subject_id"], probes["subject"], probes["relation"] = "s", "s", "r"
    write_probes(tmp_path / "probes", probes)
    texts = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11", "w2 w2 w2"]
    tokens_world(tmp_path, tmp_path / "ckpt", {"seq_id": ["a", "b", "c", "d"], "period": [1, 1, 1, 2],
                                                "split": ["heldout", "heldout", "train", "heldout"], "doc_id": "x",
                                                "text": texts})

    evaluate.run({"batch_size": 3}, model=tmp_path / "ckpt", probes=tmp_path / "probes",
                 tokens=tmp_path / "tokens", period=1, out=tmp_path / "eval")
    scores = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert sorted(scores["probe_id"]) == sorted(f"p{i}" for i in range(8))
    assert set(summary) == {"method", "seed", "period", "unchanged", "updated", "heldout_ppl", "facts"}
    # no metrics.json in the checkpoint folder and nothing given: the base model
    assert (summary["method"], summary["seed"], summary["period"]) == ("base", None, 1)
    # held-out perplexity by hand: period 1, split heldout -> texts a and b
    total, n = 0.0, 0
    for t in texts[:2]:
        s = ids(t)
        lp = direct_logprobs(model, s)
        total += sum(float(lp[k - 1, s[k]]) for k in range(1, len(s)))
        n += len(s) - 1
    assert math.isclose(summary["heldout_ppl"], math.exp(-total / n), rel_tol=1e-5)
    assert summary["unchanged"]["n"] + summary["updated"]["n"] == 8


def test_several_checkpoints_in_one_call_equal_one_call_each(tmp_path):
    """The workflow evaluates a method's seeds in one process: each checkpoint's outputs
    equal those of its own call, its period, method and seed come from its metrics.json."""
    model, tokenizer = tiny()
    for i, period in enumerate((1, 2)):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        save_model(model, tokenizer, tmp_path / f"c{i}" / "model")
        (tmp_path / f"c{i}" / "metrics.json").write_text(json.dumps({"method": "full", "seed": i, "period": period}))
    probes = make_probes(model)
    probes["period"], probes["subject_id"], probes["subject"], probes["relation"] = [1] * 8 + [2] * 3, "s", "s", "r"
    write_probes(tmp_path / "probes", probes)
    tokens_world(tmp_path, tmp_path / "c0", {"seq_id": ["a", "b"], "period": [1, 2], "split": "heldout", "doc_id": "x",
                                              "text": ["w1 w2 w3", "w4 w5"]})
    common = ["evaluate", "--probes", str(tmp_path / "probes"), "--tokens", str(tmp_path / "tokens")]
    assert cli.main(common + ["--model", str(tmp_path / "c0"), str(tmp_path / "c1"),
                              "--out", str(tmp_path / "e0"), str(tmp_path / "e1")]) == 0
    for i in (0, 1):
        assert cli.main(common + ["--model", str(tmp_path / f"c{i}"), "--out", str(tmp_path / f"one{i}")]) == 0
        both = json.loads((tmp_path / f"e{i}" / "summary.json").read_text())
        assert both == json.loads((tmp_path / f"one{i}" / "summary.json").read_text())
        assert (both["method"], both["seed"], both["period"]) == ("full", i, i + 1)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"e{i}" / "scores.parquet"),
                                      pd.read_parquet(tmp_path / f"one{i}" / "scores.parquet"))
    assert json.loads((tmp_path / "e0" / "summary.json").read_text())["heldout_ppl"] != \
        json.loads((tmp_path / "e1" / "summary.json").read_text())["heldout_ppl"]
    with pytest.raises(InputError, match=r"2 checkpoint folder\(s\) but 1 output folder\(s\)"):
        evaluate.run({}, model=[tmp_path / "c0", tmp_path / "c1"], probes=tmp_path / "probes",
                     tokens=tmp_path / "tokens", out=[tmp_path / "x"])
    save_model(model, tokenizer, tmp_path / "base" / "model")  # no metrics.json: which period?
    with pytest.raises(InputError, match="no integer 'period' in metrics.json .*give --period"):
        evaluate.run({}, model=tmp_path / "base", probes=tmp_path / "probes", tokens=tmp_path / "tokens",
                     out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_k_adapter_checkpoint_is_scored_with_its_adapters(tmp_path):
    from gradloc.methods import KAdapterModel, save_checkpoint

    model, tokenizer = tiny()
    torch.manual_seed(1)
    ka = KAdapterModel(model, layers=[0, 1], scale=1.0).eval()
    with torch.no_grad():  # adapters that visibly change the output
        for p in ka.adapters.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_checkpoint(ka, tokenizer, tmp_path / "ka" / "model")
    probes = make_probes(model)
    probes["period"], probes["subject_id"], probes["subject"], probes["relation"] = 1, "s", "s", "r"
    write_probes(tmp_path / "probes", probes)
    tokens_world(tmp_path, tmp_path / "ka", {"seq_id": ["a"], "split": ["heldout"], "doc_id": "x", "text": ["w1 w2 w3"]})
    evaluate.run({}, model=tmp_path / "ka", probes=tmp_path / "probes", tokens=tmp_path / "tokens", period=1,
                 out=tmp_path / "eval")
    got = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    with_adapters = score_probes(ka, tokenizer, probes, 4, progress=False)
    without = score_probes(model, tokenizer, probes, 4, progress=False)
    np.testing.assert_allclose(got["object_logprob"], with_adapters["object_logprob"], atol=1e-5)
    assert np.abs(got["object_logprob"] - without["object_logprob"]).max() > 1e-3


def test_identity_from_args_then_metrics_json_then_base(tmp_path):
    ckpt = tmp_path / "train" / "whatever"
    ckpt.mkdir(parents=True)
    assert evaluate.identity(ckpt, None, None) == ("base", None)
    (ckpt / "metrics.json").write_text(json.dumps({"method": "full", "seed": 3, "period": 2}))
    assert evaluate.identity(ckpt, None, None) == ("full", 3)
    assert evaluate.identity(ckpt, "lora", None) == ("lora", 3)
    assert evaluate.identity(ckpt, "lora", 7) == ("lora", 7)
    (ckpt / "metrics.json").write_text(json.dumps({"method": "full", "seed": "three"}))
    with pytest.raises(InputError, match=r"metrics\.json: key seed"):
        evaluate.identity(ckpt, None, None)


def test_cli_method_and_seed_are_optional():
    base = ["evaluate", "--model", "m", "--probes", "p", "--tokens", "t", "--period", "2", "--out", "o"]
    args = cli.build_parser().parse_args(base)
    assert args.method is None and args.seed is None
    args = cli.build_parser().parse_args(base + ["--method", "full", "--seed", "1"])
    assert args.method == "full" and args.seed == 1
    with pytest.raises(SystemExit):  # train's --seed stays required
        cli.build_parser().parse_args(["train", "--init", "i", "--tokens", "t", "--period", "1", "--out", "o"])


def test_params_are_checked_against_the_schema():
    assert evaluate.with_defaults({}) == {"batch_size": 32, "heldout_max_sequences": 200, "max_probes_per_set": None,
                                          "candidates": 10, "candidate_seed": 0, "candidate_batch_size": 128}
    with pytest.raises(InputError, match="evaluate params.*batch_sise"):
        evaluate.with_defaults({"batch_sise": 4})

"""Token weighting (`token_weighting` part) and CaMeLS meta-training (`gradloc metatrain`):
the meta-gradient against finite differences, the zero-initialised head (uniform ln2/3
weights; `full` with a scaled learning rate), determinism per seed, the baselines'
weights, training with tgl_fp, and the bad inputs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gradloc import engine, metatrain, train
from gradloc.io import InputError
from gradloc.methods import weighting
from gradloc.models import save_model
from helpers import char_tokenizer, make_tokens, tiny_gpt2, word_tokenizer, write_probes, write_tagged

torch.set_num_threads(1)

CAMELS = {"inner_steps": 2, "inner_lr": 0.05, "outer_lr": 1e-3, "outer_steps": 4, "val_every": 2, "patience": 2,
          "val_fraction": 0.3, "val_episodes": 1, "kl_docs": 2, "max_tokens": 48, "head_hidden": 8, "seed": 0}
COMMON = {"lr": 1e-3, "epochs": 1, "batch_size": 4, "seq_len": 32, "log_every": 1, "grad_clip": None}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base and small model (one char tokenizer), T0 documents with probes, period 1 with its own."""
    root = tmp_path_factory.mktemp("camels")
    save_model(tiny_gpt2(96, n_layer=2), char_tokenizer(), root / "base_model" / "model")
    save_model(tiny_gpt2(96, n_layer=1, n_embd=16, seed=1), char_tokenizer(), root / "small_model" / "model")
    names = [f"Ent{i}" for i in range(12)]
    rows = [("base", 0, f"{n} lives in Town{i % 4}.", n) for i, n in enumerate(names)]
    rows += [("base", 0, "The weather was mild.", None)]
    rows += [("train", 1, f"{n} moved to Port{i}.", n) for i, n in enumerate(names[:3])]
    seqs = pd.DataFrame([{"seq_id": f"s{i}", "period": p, "split": s, "text": t, "knowledge_type": "updated"}
                         for i, (s, p, t, _) in enumerate(rows)])
    mentions = pd.DataFrame([{"seq_id": f"s{i}", "entity_id": n, "start": 0, "end": len(n)}
                             for i, (_, _, t, n) in enumerate(rows) if n])
    write_tagged(root / "tagged", seqs, mentions)
    probes = [{"period": 0, "set": "unchanged", "subject_id": n, "prefix": f"{n} lives in", "object": f"Town{i % 4}"}
              for i, n in enumerate(names)]
    probes += [{"period": 1, "set": "updated", "subject_id": n, "prefix": f"{n} moved to", "object": f"Port{i}"}
               for i, n in enumerate(names[:3])]
    # an unchanged fact probed in period 1 (forgetting): its entity may still be meta-trained on
    probes += [{"period": 1, "set": "unchanged", "subject_id": names[3], "prefix": f"{names[3]} lives in",
                "object": "Town3"}]
    write_probes(root / "probes", probes)
    # the corpus' facts: salient spans mark their objects, never the probes' (which train cannot see)
    triples = [{"snapshot": k, "subject_id": n, "subject": n, "relation": "residence",
                "object": f"Port{i}" if k == 1 and i < 3 else f"Town{i % 4}"}
               for k in (0, 1) for i, n in enumerate(names)]
    (root / "corpus").mkdir()
    pd.DataFrame(triples).to_parquet(root / "corpus" / "triples.parquet")
    make_tokens(root / "base_model", root / "tagged", root / "tokens")
    metatrain.run(CAMELS, base=root / "base_model", backbone=root / "small_model", tokens=root / "tokens",
                  tagged=root / "tagged", probes=root / "probes", out=root / "weighting_model")
    return root


def toy(dtype=torch.float64):
    """A tiny base model, a weighting model with a random (non-zero) head, two documents, probes, KL text."""
    base = tiny_gpt2(20, n_layer=1, n_embd=8, n_positions=16).to(dtype).eval().requires_grad_(False)
    metatrain.twice_differentiable(base)
    wm = weighting.WeightingModel(tiny_gpt2(20, n_layer=1, n_embd=8, n_positions=16, seed=1), hidden=4).to(dtype)
    torch.manual_seed(2)
    for p in wm.head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(3)
    ep = {"docs": [torch.randint(1, 20, (1, 9), generator=g) for _ in range(2)],
          "probes": metatrain.pad([[3, 4, 5, 6], [7, 8, 9]], [[-100, -100, 5, 6], [-100, -100, 9]]),
          "kl": metatrain.pad([[1, 2, 3, 4, 5], [6, 7, 8]])}
    return base, wm.eval(), ep


def test_meta_gradient_equals_finite_differences():
    """Two unrolled inner steps (so second-order terms count), float64 models: the
    directional derivative of the outer loss along a random direction of every
    weighting-model parameter agrees with a central difference to 1e-3 relative (the
    losses are float32, `lm_loss` upcasts to it: eps 1e-3 keeps their rounding ~1e-5
    relative and the O(eps^2) truncation below that)."""
    base, wm, ep = toy()
    cfg = {"inner_lr": 0.5, "kl_coef": 0.1}
    theta = {k: v.detach() for k, v in base.named_parameters()}
    params = [p for p in wm.parameters()]
    direction = [torch.randn_like(p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    loss = metatrain.outer_loss(wm, base, theta, ep, cfg)[0]
    analytic = sum((g * d).sum() for g, d in zip(torch.autograd.grad(loss, params), direction))

    def at(sign, eps=1e-6):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        value = float(metatrain.outer_loss(wm, base, theta, ep, cfg)[0].detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (at(1) - at(-1)) / 2e-6
    assert abs(float(analytic)) > 1e-4  # the weights do move the outer loss
    assert float(analytic) == pytest.approx(numeric, rel=1e-6)


def test_zero_initialised_head_gives_uniform_weights_and_full_with_a_scaled_lr():
    base, _, ep = toy()
    wm = weighting.WeightingModel(tiny_gpt2(20, n_layer=1, n_embd=8, n_positions=16, seed=1), hidden=4).double()
    w = wm(ep["docs"][0])
    c = math.log(2) / 3
    assert torch.allclose(w, torch.full_like(w, c), atol=1e-12)
    theta = {k: v.detach() for k, v in base.named_parameters()}
    weighted = metatrain.inner_updates(base, theta, ep["docs"], [wm(d) for d in ep["docs"]], lr=0.5)
    ones = [torch.ones(d.shape, dtype=torch.float64) for d in ep["docs"]]
    plain = metatrain.inner_updates(base, theta, ep["docs"], ones, lr=0.5 * c)
    for k in theta:
        assert torch.allclose(weighted[k], plain[k], atol=1e-12), k


def test_metatrain_writes_the_model_curve_and_metrics(world):
    out = world / "weighting_model"
    curve = pd.read_csv(out / "curve.csv")
    assert list(curve["step"]) == [0, 2, 4] and curve["val_loss"].notna().all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_step"] in (0, 2, 4) and m["train_docs"] > 0 and m["val_docs"] > 0
    assert set(m["object_vs_other_weight"]) >= {"fact", "other", "ratio"}
    wm, tok = weighting.WeightingModel.load(out)
    assert isinstance(wm, weighting.WeightingModel) and len(tok) == 96


def test_metatrain_is_deterministic_per_seed(world, tmp_path):
    metatrain.run(CAMELS, base=world / "base_model", backbone=world / "small_model", tokens=world / "tokens",
                  tagged=world / "tagged", probes=world / "probes", out=tmp_path / "again")
    a, b = load_file(world / "weighting_model" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.load(world / "weighting_model" / "head.pt")["2.weight"],
                       torch.load(tmp_path / "again" / "head.pt")["2.weight"])
    doc = [np.arange(1, 30)]
    wa = weighting.model_weights(weighting.WeightingModel.load(world / "weighting_model")[0], doc)
    wb = weighting.model_weights(weighting.WeightingModel.load(tmp_path / "again")[0], doc)
    assert np.array_equal(wa[0], wb[0])


def test_metatrain_bad_inputs(world, tmp_path):
    args = dict(base=world / "base_model", tokens=world / "tokens", tagged=world / "tagged", out=tmp_path / "w")
    save_model(tiny_gpt2(4), word_tokenizer(["<eos>", "<unk>", "a", "b"]), tmp_path / "other" / "model")
    with pytest.raises(InputError, match="tokenizer differs"):
        metatrain.run(CAMELS, backbone=tmp_path / "other", probes=world / "probes", **args)
    with pytest.raises(InputError, match="inner_steps"):
        metatrain.run({**CAMELS, "inner_steps": 0}, backbone=world / "small_model", probes=world / "probes", **args)
    (tmp_path / "p").mkdir()
    pr = pd.read_parquet(world / "probes" / "probes.parquet")
    pr[pr["period"] > 0].to_parquet(tmp_path / "p" / "probes.parquet")
    with pytest.raises(InputError, match="question set is empty"):
        metatrain.run(CAMELS, backbone=world / "small_model", probes=tmp_path / "p", **args)


def test_uptake_entities_are_left_out_of_meta_training(world):
    from gradloc.tokens import load

    toks = load(world / "tokens")
    data = metatrain.episodes_data(toks, char_tokenizer(), world / "tagged", world / "probes",
                                   {**CAMELS, "val_fraction": 0.3})
    used = {d["entity"] for d in data["train"] + data["val"]}
    assert used and not used & {"Ent0", "Ent1", "Ent2"}  # their update is probed in period 1
    assert "Ent3" in used, "an entity probed only for forgetting (unchanged) is meta-trained on"
    assert not {d["entity"] for d in data["train"]} & {d["entity"] for d in data["val"]}


# --- the method part -------------------------------------------------------------------------

def run_train(world, out, method, **kw):
    params = {"name": "m", "common": COMMON, "method": method}
    return train.run(params, init=world / "base_model", tokens=world / "tokens", period=1, seed=0, out=out,
                     tagged=world / "tagged", corpus=world / "corpus", selection=kw.pop("selection", None), **kw)


def test_baseline_weights():
    docs = [np.array([1, 2, 3, 1]), np.array([1, 4, 4, 5])]
    assert all((w == 1).all() for w in weighting.doc_weights({"kind": "uniform"}, docs))
    tf = weighting.tfidf(docs)
    assert tf[0][0] == 0 and tf[0][1] > 0 and tf[1][1] > tf[1][3] > 0  # token 1 is in every document
    assert all(w.mean() == pytest.approx(1) for w in tf)
    sal = weighting.doc_weights({"kind": "salient_spans", "other": 0.1}, docs,
                                [np.array([0, 1, 1, 0]), np.zeros(4)])
    assert list(sal[0]) == pytest.approx([0.1, 1, 1, 0.1])
    blocks = engine.cut_blocks(docs, 3, 0, sal)
    assert blocks["weights"].shape == (3, 3) and blocks["weights"][2, 2] == 0  # padding weighs 0


def test_uniform_equals_full_bit_for_bit(world, tmp_path):
    run_train(world, tmp_path / "full", {})
    run_train(world, tmp_path / "uni", {"token_weighting": {"kind": "uniform"}})
    a, b = load_file(tmp_path / "full" / "model" / "model.safetensors"), load_file(tmp_path / "uni" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_untrained_camels_is_full_under_adam(world, tmp_path):
    """Zero head: every weight ln2/3, so the loss (and every gradient) is full's times ln2/3;
    AdamW's step is invariant to that scale except where a gradient is near its eps (1e-8):
    one step moves each parameter by at most lr in both runs, the same way up to lr/2."""
    from gradloc.methods import load_checkpoint

    c = math.log(2) / 3
    weighting.WeightingModel(load_checkpoint(world / "small_model")[0], hidden=8).save(tmp_path / "zero",
                                                                                       char_tokenizer())
    full = run_train(world, tmp_path / "full", {})
    cam = run_train(world, tmp_path / "cam", {"token_weighting": {"kind": "camels"}}, weighting_model=tmp_path / "zero")
    assert cam["steps"] == 1 and cam["token_weighting"]["mean_weight"] == pytest.approx(c, rel=1e-6)
    assert cam["final_loss"] == pytest.approx(c * full["final_loss"], rel=1e-5)
    a, b = load_file(tmp_path / "full" / "model" / "model.safetensors"), load_file(tmp_path / "cam" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=COMMON["lr"] / 2) for k in a)


def test_salient_spans_with_tgl_fp_and_camels_train(world, tmp_path):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"granularity": "block", "units": ["block.1"], "rule": "mean",
                               "lr_multipliers": {"block.0": 1.0, "block.1": 1.0}}))
    m = run_train(world, tmp_path / "sal", {"layers": "tgl_fp", "token_weighting": {"kind": "salient_spans"}},
                  selection=sel)
    s = m["token_weighting"]
    assert s["all"]["fact"] == 1 and s["all"]["other"] == 0 and m["trained_units"] == ["block.1"]
    doc = json.loads((tmp_path / "sal" / "weights.json").read_text())["example"]
    assert "".join(t for t, mk in zip(doc["tokens"], doc["marked"]) if mk).startswith("Ent0Port0")
    m = run_train(world, tmp_path / "cam", {"layers": "tgl_fp", "token_weighting": {"kind": "camels"}},
                  selection=sel, weighting_model=world / "weighting_model")
    assert m["token_weighting"]["all"]["ratio"] > 0
    with pytest.raises(InputError, match="weighting-model"):
        run_train(world, tmp_path / "x", {"token_weighting": {"kind": "camels"}})


def test_train_refuses_the_old_probes_input_naming_the_corpus(world, tmp_path):
    with pytest.raises(InputError, match="--probes is no longer read.*--corpus"):
        run_train(world, tmp_path / "x", {"token_weighting": {"kind": "salient_spans"}}, probes=world / "probes")


def test_camels_refuses_a_weighting_model_with_another_tokenizer(world, tmp_path):
    wm = weighting.WeightingModel(tiny_gpt2(4), hidden=4)
    wm.save(tmp_path / "other", word_tokenizer(["<eos>", "<unk>", "a", "b"]))
    with pytest.raises(InputError, match="tokenizer differs"):
        run_train(world, tmp_path / "x", {"token_weighting": {"kind": "camels"}}, weighting_model=tmp_path / "other")


def test_report_section_and_figure(world, tmp_path):
    from gradloc.report import weighting_report

    run_train(world, tmp_path / "cam", {"token_weighting": {"kind": "camels"}}, weighting_model=world / "weighting_model")
    run_train(world, tmp_path / "sal", {"token_weighting": {"kind": "salient_spans"}})
    text = weighting_report([tmp_path / "cam", tmp_path / "sal"], world / "weighting_model", tmp_path / "w.png", 60)
    assert "## Token weighting" in text and "CaMeLS meta-training" in text
    assert "| m | 1 | salient_spans | all | 1.000 | 0.000 | – |" in text  # no ratio: other tokens weigh 0
    assert (tmp_path / "w.png").stat().st_size > 1000

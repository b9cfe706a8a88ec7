"""Knowledge-critical subnetworks on tiny real models: the straight-through estimator,
the bit-packed masks, an all-zero removal mask, and a planted case where a fact set was
trained into one block alone."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradloc import core, schema, subnet
from gradloc.io import InputError
from helpers import tiny_gpt2, word_tokenizer

torch.set_num_threads(1)

SUBJECTS = [f"s{i}" for i in range(24)]
OBJECTS = [f"o{i}" for i in range(8)]
WORDS = ["<eos>", "<unk>", "lives", "in", "the", "city", "of", "and", "a", "is", *SUBJECTS, *OBJECTS]


def facts(subjects, seed):
    rng = np.random.default_rng(seed)
    objs = rng.choice(OBJECTS, len(subjects))
    return pd.DataFrame({"probe_id": subjects, "set": "x", "prefix": [f"{s} lives in" for s in subjects],
                         "object": objs, "statement": [f"{s} lives in {o}" for s, o in zip(subjects, objs)]})


def memorise(model, tok, df, params, steps=300, lr=3e-3):
    ids = torch.tensor([tok(s)["input_ids"] for s in df["statement"]])
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def top1(model, tok, df):
    return subnet.removal_metrics(model, tok, df, df, [], 16)["target_top1"]


def test_straight_through_passes_gradients_to_the_logits():
    logits = torch.zeros(50, requires_grad=True)
    m = subnet.straight_through(logits)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}  # a hard sample forwards
    (m * torch.arange(1.0, 51.0)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).all()
    # without noise, the gradient is exactly the sigmoid's
    logits2 = torch.full((3,), 0.3, requires_grad=True)
    subnet.straight_through(logits2, noise=False).sum().backward()
    s = torch.sigmoid(torch.tensor(0.3))
    assert torch.allclose(logits2.grad, (s * (1 - s)).expand(3))


def test_pack_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    masks = {"a.weight": rng.random((7, 13)) < 0.1, "b.weight": rng.random((1, 5)) < 0.5}
    np.savez(tmp_path / "m.npz", **subnet.pack(masks))
    with np.load(tmp_path / "m.npz") as f:
        back = core.unpack(f)
    assert back.keys() == masks.keys()
    for k in masks:
        assert back[k].shape == masks[k].shape and (back[k] == masks[k]).all()
    assert subnet.pack(masks)["a.weight"].nbytes == 12  # 91 bits in 12 bytes


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_nothing_removed_leaves_outputs_bit_identical(granularity):
    model = tiny_gpt2(40, n_layer=2).eval()
    targets = subnet.mask_targets(model, None, granularity)
    assert {u for u, _, _ in targets.values()} == {"block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp"}
    ids = torch.randint(0, 40, (3, 10))
    zeros = {n: torch.zeros(shape) for n, (_, _, shape) in targets.items()}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        masked = torch.func.functional_call(model, subnet.remaining_weights(model, zeros), (ids,)).logits
        copy = subnet.removed(model, {n: np.zeros(s, bool) for n, (_, _, s) in targets.items()})(input_ids=ids).logits
    assert torch.equal(plain, masked) and torch.equal(plain, copy)


def test_planted_block_is_found_and_its_removal_forgets_only_the_target():
    """Control facts trained into the whole model, then target facts into block 1 alone:
    the mask is densest in block 1, and removing it forgets the target, not the control;
    a random mask of the same per-tensor density is far less selective."""
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(WORDS), n_layer=3, n_embd=32, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    control, target = facts(SUBJECTS[:16], 0), facts(SUBJECTS[16:], 1)
    memorise(model, tok, control, model.parameters())
    # the target facts enter block 1 only (with the control facts, so those stay)
    memorise(model, tok, pd.concat([target, control]), model.transformer.h[1].parameters())
    assert top1(model, tok, target) == 1.0 and top1(model, tok, control) >= 0.9

    params = schema.fill("subnet", {"steps": 150, "seeds": [0]})
    targets = subnet.mask_targets(model, None, "weight")
    lm_seqs = [np.asarray(tok(" ".join(f"{s} lives in {o}" for s, o in zip(control["prefix"], control["object"])))
                          ["input_ids"][:30])]
    hard, log_rows, _ = subnet.train_mask(model, tok, targets, target, control, lm_seqs, params, seed=0)
    assert log_rows and all(np.isfinite(r["loss"]) for r in log_rows)
    density = subnet.density_table(model, targets, hard)
    blocks = density[density["granularity"] == "block"].set_index("unit")["density"]
    assert blocks.idxmax() == "block.1", blocks.to_dict()
    assert blocks.max() < 0.3

    full = subnet.expand(model, hard)
    gone = subnet.removed(model, full)
    assert top1(gone, tok, target) <= 0.25
    assert top1(gone, tok, control) >= 0.75
    # A random mask of the same per-tensor density is not selective: it takes the
    # target and the control down alike (at this tiny size it does damage both).
    rand = subnet.removed(model, subnet.random_like(full, 0))
    g, r = (subnet.removal_metrics(m, tok, target, control, [], 16) for m in (gone, rand))
    # At this size a random ~15% mask damages everything (target ppl ~150 vs the
    # subnetwork's ~70), so the test is selectivity: the subnetwork's removal keeps the
    # control far better and hits the target relative to the control harder.
    assert g["control_top1"] >= r["control_top1"] and g["control_object_ppl"] < r["control_object_ppl"]
    assert g["target_object_ppl"] / g["control_object_ppl"] > 1.3 * r["target_object_ppl"] / r["control_object_ppl"]


def test_localization_rank_correlation():
    """The report pairs each mask's density with the matching TGL type's relative norm."""
    from gradloc.report import table

    units = [f"block.{i}" for i in range(5)]
    density = pd.DataFrame({"knowledge_set": "outdated_P1", "kind": "outdated", "period": 1, "seed": 0,
                            "granularity": "block", "unit": units, "layer": range(5),
                            "density": [0.01, 0.02, 0.05, 0.03, 0.04]})
    relative = pd.concat([
        pd.DataFrame({"knowledge_type": "updated", "granularity": "block", "unit": units,
                      "rel": [1.0, 1.1, 1.5, 1.2, 1.3]}),
        pd.DataFrame({"knowledge_type": "new", "granularity": "block", "unit": units, "rel": [5, 4, 3, 2, 1.0]})])
    paired, corr = table.localization(density, relative, n_boot=200)
    assert len(paired) == 5 and set(paired["knowledge_type"]) == {"updated"}
    row = corr.iloc[0]
    assert row["spearman"] == pytest.approx(1.0) and row["hi"] == pytest.approx(1.0) and row["lo"] <= 1.0
    assert row["top_density"] == row["top_rel"] == "block.2"


# --- which facts the masks train on ----------------------------------------------------------

def corpus_world(tmp_path, probed=("A", "B")):
    """Six subjects over two snapshots, each changing its city in period 1; `probed` carry
    evaluation probes. The corpus is 'local' (default wording: 'subject relation')."""
    from gradloc.io import write_json

    rows = [(k, s, s, rel, obj) for s in "ABCDEF" for k, rel, obj in
            ((0, "city", f"{s}-old"), (1, "city", f"{s}-new"), (0, "job", f"{s}-job"), (1, "job", f"{s}-job"))]
    (tmp_path / "corpus").mkdir()
    pd.DataFrame(rows, columns=["snapshot", "subject_id", "subject", "relation", "object"]).to_parquet(
        tmp_path / "corpus" / "triples.parquet")
    write_json({"source": "local"}, tmp_path / "corpus" / "manifest.json")
    probes = pd.DataFrame([{"period": 1, "set": st, "subject_id": s, "relation": "city", "object": f"{s}-{o}",
                            "prefix": f"Where is {s}?", "statement": f"Where is {s}? {s}-{o}"}
                           for s in probed for st, o in (("updated", "new"), ("outdated", "old"))])
    return tmp_path / "corpus", probes


def test_mask_facts_come_from_the_corpus_about_unprobed_subjects(tmp_path):
    corpus, probes = corpus_world(tmp_path)
    p = schema.fill("subnet", {"periods": [1], "n_control": 2})
    f = subnet.corpus_facts(p, corpus, probes)
    assert set(f["subject_id"]) == set("CDEF")  # A and B are evaluated: never mask facts
    out = f[f["set"] == "outdated"].sort_values("subject_id")
    assert list(out["object"])[:2] == ["C-old", "D-old"] and list(out["statement"])[0] == "C city C-old"
    assert set(f.loc[f["set"] == "unchanged", "object"]) == {f"{s}-job" for s in "CDEF"}
    sets, control = subnet.knowledge_sets(p, f.assign(probe_id=f.index.astype(str)), None)
    assert len(sets["outdated_P1"]) == 4 and len(control) == 2 and len(sets["unchanged_P1"]) == 2
    assert subnet.overlap(probes, pd.concat([*sets.values(), control])) == {
        "eval_probes_sharing_a_fact": 0, "eval_probes_sharing_a_subject": 0}
    # the old way, on the probes themselves: every outdated probe is a mask fact
    assert subnet.overlap(probes, probes[probes["set"] == "outdated"])["eval_probes_sharing_a_fact"] == 2


def test_no_unprobed_facts_fail_naming_the_oracle_option(tmp_path):
    corpus, probes = corpus_world(tmp_path, probed="ABCDEF")
    with pytest.raises(InputError, match="no facts of period 1 .*subnet.facts: probes"):
        subnet.corpus_facts(schema.fill("subnet", {"periods": [1]}), corpus, probes)


def test_report_labels_subnet_methods_oracle_only_when_the_masks_saw_the_probes(tmp_path):
    from gradloc.io import write_json
    from gradloc.report import oracle_labels

    trains = []
    for name, cfg in (("full", {}), ("sub", {"layers": "subnet"}), ("sub_mask", {"mask": "subnet"})):
        (tmp_path / name).mkdir()
        write_json({"method": name, "method_config": cfg}, tmp_path / name / "metrics.json")
        trains.append(tmp_path / name)
    (tmp_path / "subnet").mkdir()
    write_json({"oracle": False}, tmp_path / "subnet" / "metrics.json")
    assert oracle_labels(tmp_path / "subnet", trains) == {}
    write_json({"oracle": True}, tmp_path / "subnet" / "metrics.json")
    assert oracle_labels(tmp_path / "subnet", trains) == {"sub": "sub (oracle)", "sub_mask": "sub_mask (oracle)"}

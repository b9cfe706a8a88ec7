"""Per-example gradient norms from one batched pass against the naive computation (one
backward per sequence), and the profile stage's outputs."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from gradloc import profile
from gradloc.models import layer_units, save_model
from helpers import tokens_world, word_tokenizer, write_probes

torch.set_num_threads(1)
V = 50
CONFIGS = {
    # n_embd large against T: the ghost-norm branch; small: the materialised A^T G branch
    "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0),
    "gpt2_narrow": GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0,
                              eos_token_id=0),
    "llama": LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=48, vocab_size=V, max_position_embeddings=32),
    "llama_tied": LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                              intermediate_size=24, vocab_size=V, max_position_embeddings=32,
                              tie_word_embeddings=True),
    "neox": GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                          vocab_size=V, max_position_embeddings=32),
}


def build(kind):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind])
    # non-trivial norm weights and biases, so their gradients are not all alike
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    ids[0, :3] = 5  # a repeated token: embedding rows shared within an example
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def naive_norms(model, ids, mask, units):
    """One backward per sequence, unpadded, mean token loss; p.grad norms per unit."""
    params = dict(model.named_parameters())
    out = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        x = ids[i:i + 1, :n]
        model.zero_grad()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
        loss.backward()
        out.append([float(sum(params[p].grad.double().pow(2).sum() for p in names if params[p].grad is not None)) ** 0.5
                    for names in units.values()])
    model.eval()
    model.zero_grad()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_matches_naive(kind, granularity):
    model = build(kind).eval()
    units = layer_units(model, granularity)
    ids, mask = batch([9, 4, 12, 2, 7])
    fast = profile.per_example_grad_norms(model, ids, mask, units).double()
    slow = naive_norms(model, ids, mask, units)
    assert fast.shape == (5, len(units))
    assert (slow > 0).all()
    rel = ((fast - slow).abs() / slow).max().item()
    assert rel <= 1e-4, (rel, list(units))
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients are formed"


def test_tied_embedding_cross_term_matters():
    """Tied lm_head: the norm is of the summed gradient, not the sum of two norms."""
    model = build("gpt2").eval()
    units = {"embed": ["transformer.wte.weight"]}
    ids, mask = batch([6, 6])
    fast = profile.per_example_grad_norms(model, ids, mask, units).double()
    slow = naive_norms(model, ids, mask, units)
    assert torch.allclose(fast, slow, rtol=1e-4)


def tokenizer():
    return word_tokenizer(["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)])


def write_inputs(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        kt = ["new", "updated", "unchanged", "none"][i % 4]
        split = "base" if i < 12 else "train"
        text = " ".join(f"w{j}" for j in rng.integers(0, V - 2, size=rng.integers(3, 15)))
        rows.append({"seq_id": f"s{i}", "period": 0 if split == "base" else 1, "split": split,
                     "doc_id": f"E{i % 5}_0", "origin": "base", "text": text,
                     "knowledge_type": kt if split == "train" else "none"})
    model = build("gpt2")
    save_model(model, tokenizer(), tmp_path / "base" / "model")
    tokens_world(tmp_path, tmp_path / "base", rows)
    write_corpus(tmp_path, [f"E{j}_0" for j in range(5)], {"E0": "new", "E1": "new"})
    return model


def write_corpus(tmp_path, doc_ids, status, triples=()):
    """corpus/ (documents titled by their entity's name, entities, triples) and
    tagged/entity_status.parquet (period 1: `status`, else unchanged)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    ents = sorted({d.split("_")[0] for d in doc_ids})
    pd.DataFrame({"doc_id": doc_ids, "snapshot": 1, "title": [f"name{d.split('_')[0]}" for d in doc_ids],
                  "text": "", "kind": "full"}).to_parquet(corpus / "documents.parquet")
    pd.DataFrame({"entity_id": ents, "name": [f"name{e}" for e in ents]}).to_parquet(corpus / "entities.parquet")
    pd.DataFrame(list(triples) or [(0, "E9", "nameE9", "r", "w1")],
                 columns=["snapshot", "subject_id", "subject", "relation", "object"]).to_parquet(
        corpus / "triples.parquet")
    pd.DataFrame([(k, e, status.get(e, "unchanged") if k == 1 else "unchanged") for k in (0, 1) for e in ents],
                 columns=["period", "entity_id", "status"]).to_parquet(tmp_path / "tagged" / "entity_status.parquet")
    return corpus


def test_run_outputs(tmp_path):
    write_inputs(tmp_path)
    params = {"n_sequences": 5, "batch_size": 4, "seq_len": 8, "bootstrap": 50, "control": "base", "loss": "sequence"}
    profile.run(params, model=tmp_path / "base", tokens=tmp_path / "tokens", probes=tmp_path / "none",
                out=tmp_path / "profile", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    norms = pd.read_parquet(tmp_path / "profile" / "norms.parquet")
    rel = pd.read_csv(tmp_path / "profile" / "relative.csv")
    assert list(norms.columns) == ["seq_id", "knowledge_type", "entity", "granularity", "unit", "layer", "norm"]
    block = norms[norms["granularity"] == "block"]
    assert block["unit"].unique().tolist() == ["embed", "block.0", "block.1", "final_norm"]
    assert (block.groupby("knowledge_type")["seq_id"].nunique() <= 5).all()
    assert set(block["knowledge_type"]) == {"new", "updated", "unchanged", "control"}
    # module norms aggregate to block norms
    mod = norms[(norms["granularity"] == "module") & norms["unit"].str.startswith("block.0.")]
    agg = mod.groupby("seq_id")["norm"].apply(lambda s: float(np.sqrt((s ** 2).sum())))
    b0 = block[block["unit"] == "block.0"].set_index("seq_id")["norm"]
    np.testing.assert_allclose(agg.sort_index(), b0.sort_index(), rtol=1e-5)
    # rel is the ratio of means, inside its bootstrap interval
    for r in rel[rel["granularity"] == "block"].itertuples():
        u = block[block["unit"] == r.unit]
        expect = u[u["knowledge_type"] == r.knowledge_type]["norm"].mean() / u[u["knowledge_type"] == "control"]["norm"].mean()
        assert abs(r.rel - expect) < 1e-9 and r.lo <= r.rel <= r.hi
    assert (tmp_path / "profile" / "heatmap.png").stat().st_size > 1000
    # same params, same numbers
    profile.run(params, model=tmp_path / "base", tokens=tmp_path / "tokens", probes=tmp_path / "none",
                out=tmp_path / "profile2", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    pd.testing.assert_frame_equal(rel, pd.read_csv(tmp_path / "profile2" / "relative.csv"))


def test_probe_source(tmp_path):
    write_inputs(tmp_path)
    write_probes(tmp_path / "probes", {"probe_id": [f"p{i}" for i in range(6)], "period": [1] * 6,
                  "set": ["new", "updated", "unchanged"] * 2, "subject_id": "x", "subject": "x",
                  "relation": "r", "object": "w3", "prefix": "w1 w2",
                  "statement": [f"w1 w2 w{i + 3}" for i in range(6)]})
    profile.run({"source": "probes", "n_sequences": 4, "bootstrap": 0, "control": "base", "loss": "sequence"}, model=tmp_path / "base",
                tokens=tmp_path / "tokens", probes=tmp_path / "probes", out=tmp_path / "profile",
                tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    norms = pd.read_parquet(tmp_path / "profile" / "norms.parquet")
    assert norms.groupby("knowledge_type")["seq_id"].nunique().to_dict() == {
        "new": 2, "updated": 2, "unchanged": 2, "control": 4}


def write_mentions(tmp_path):
    seqs = pd.read_parquet(tmp_path / "tagged" / "sequences.parquet")
    rows = []
    for r in seqs.itertuples():  # the second word of every sequence is an entity mention
        words = r.text.split(" ")
        if len(words) >= 2:
            start = len(words[0]) + 1
            status = r.knowledge_type if r.knowledge_type in ("new", "updated", "unchanged") else "unchanged"
            rows.append({"seq_id": r.seq_id, "period": r.period, "entity_id": "e", "start": start,
                         "end": start + len(words[1]), "status": status})
    pd.DataFrame(rows).to_parquet(tmp_path / "tagged" / "mentions.parquet")


def test_salient_loss_and_controls(tmp_path):
    model = write_inputs(tmp_path)
    write_mentions(tmp_path)
    tok = tokenizer()
    base = {"n_sequences": 5, "batch_size": 4, "seq_len": 8, "bootstrap": 20}
    p = profile.with_defaults(base)
    assert (p["control"], p["loss"]) == ("auto", "salient")
    # a model trained here on all of T0: auto falls back to T0 text (memorised, said in the log)
    assert profile.resolve_control(p, tmp_path / "base") == "base"
    # unchanged diff text, disjoint from the unchanged sample
    seqs = profile.diagnostic_sequences({**p, "control": "unchanged_diff"}, tmp_path / "tokens", None, tok,
                                        model_dir=tmp_path / "base", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    ctrl = set(seqs.loc[seqs["knowledge_type"] == "control", "seq_id"])
    assert ctrl and not ctrl & set(seqs.loc[seqs["knowledge_type"] == "unchanged", "seq_id"])
    assert all(int(s[1:]) >= 12 for s in ctrl)  # diff (train) sequences, not base
    # the salient mask marks exactly the second word (after the leading ids)
    for ids, mask in zip(seqs["ids"], seqs["mask"]):
        assert sum(mask) == 1 and len(mask) == len(ids) and mask.index(1) >= 1
    # salient loss == the loss of that one target token: its gradient equals a masked naive one
    norms = profile.profile_norms(model, tok, seqs, 8, 4)
    row = seqs.iloc[0]
    ids = torch.tensor([row["ids"][:8]])
    model.eval()
    model.zero_grad()
    out = model(ids).logits[0, :-1]
    j = row["mask"].index(1) - 1  # the position predicting the salient token
    torch.nn.functional.cross_entropy(out[j:j + 1], ids[0, j + 1:j + 2]).backward()
    naive = torch.sqrt(sum(p.grad.pow(2).sum() for n, p in model.named_parameters() if n.startswith("transformer.h.0.")))
    got = norms[(norms["seq_id"] == row["seq_id"]) & (norms["unit"] == "block.0")]["norm"].iloc[0]
    assert abs(got - naive.item()) < 1e-4 * max(1.0, naive.item())
    # base control: the old behaviour
    seqs_b = profile.diagnostic_sequences({**p, "control": "base"}, tmp_path / "tokens", None, tok,
                                          model_dir=tmp_path / "base", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    assert all(int(s[1:]) < 12 for s in seqs_b.loc[seqs_b["knowledge_type"] == "control", "seq_id"])
    # heldout_base: only T0 sequences the base model listed as held out; refused without them
    with pytest.raises(Exception, match="held out no T0 text"):
        profile.diagnostic_sequences({**p, "control": "heldout_base"}, tmp_path / "tokens", None, tok,
                                     model_dir=tmp_path / "base", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    (tmp_path / "base" / "heldout_base.txt").write_text("s1\ns2\n")
    (tmp_path / "base" / "metrics.json").write_text('{"source": "scratch", "heldout_base": 2}')
    assert profile.resolve_control(p, tmp_path / "base") == "heldout_base"
    seqs_h = profile.diagnostic_sequences(p, tmp_path / "tokens", None, tok, model_dir=tmp_path / "base",
                                          tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    assert set(seqs_h.loc[seqs_h["knowledge_type"] == "control", "seq_id"]) == {"s1", "s2"}
    (tmp_path / "base" / "metrics.json").write_text('{"source": "pretrained", "teach_t0": false}')
    assert profile.resolve_control(p, tmp_path / "base") == "base"
    # the stage end to end with the defaults
    profile.run(base, model=tmp_path / "base", tokens=tmp_path / "tokens", probes=tmp_path / "none",
                out=tmp_path / "profile", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    rel = pd.read_csv(tmp_path / "profile" / "relative.csv")
    cand = rel[rel["unit"].str.match(r"^block\.\d+$")]
    assert cand[["d", "d_lo", "d_hi"]].notna().all().all() and rel.loc[rel["unit"] == "embed", "d"].isna().all()
    assert (cand["d_lo"] <= cand["d"]).all() and (cand["d"] <= cand["d_hi"]).all()
    assert (tmp_path / "profile" / "significance.png").stat().st_size > 1000


# --- issue #24: pools, salient object, cluster bootstrap, simultaneous band, permutation test


def write_pools(tmp_path):
    """A period-1 diff with designed sequences: u1 (E2, updated) states E2's new object w7;
    u2 (E3, updated) states none of E3's objects; n1 is about the new E0; n2 is E2's update
    naming the new E0 (tagged `new`); infoboxes (`*_facts`) in the diff and in T0."""
    rows = [  # seq_id, split, doc_id, knowledge_type, text
        ("b0", "base", "E4_0", "none", "w1 w2 w3 w4"), ("b1", "base", "E4_1", "none", "w2 w3 w4 w5"),
        ("b2", "base", "E4_facts", "none", "w9 w2 w8"),
        ("u1", "train", "E2_0", "updated", "w1 w2 w7 w3"), ("u2", "train", "E3_0", "updated", "w1 w4 w5 w6"),
        ("n1", "train", "E0_0", "new", "w1 w2 w3 w4"), ("n2", "train", "E2_1", "new", "w1 w2 w3 w8"),
        ("nb", "train", "E0_facts", "new", "w3 w2 w4"), ("c1", "train", "E4_2", "unchanged", "w1 w2 w5 w6"),
    ]
    rows = [{"seq_id": s, "period": 0 if sp == "base" else 1, "split": sp, "doc_id": d, "origin": "base",
             "text": t, "knowledge_type": kt} for s, sp, d, kt, t in rows]
    save_model(build("gpt2"), tokenizer(), tmp_path / "base" / "model")
    tokens_world(tmp_path, tmp_path / "base", rows)
    write_mentions(tmp_path)  # the second word of each sequence
    triples = [(0, "E2", "nameE2", "r", "w5"), (1, "E2", "nameE2", "r", "w7"),
               (0, "E3", "nameE3", "r", "w6"), (1, "E3", "nameE3", "r", "w9"), (1, "E0", "nameE0", "r", "w4")]
    docs = sorted({r["doc_id"] for r in rows})
    return write_corpus(tmp_path, docs, {"E0": "new", "E2": "updated", "E3": "updated"}, triples)


def pools_of(tmp_path, **params):
    p = profile.with_defaults({"n_sequences": 10, "control": "base", **params})
    seqs = profile.diagnostic_sequences(p, tmp_path / "tokens", None, tokenizer(), model_dir=tmp_path / "base",
                                        tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    return seqs, {kt: sorted(g["seq_id"]) for kt, g in seqs.groupby("knowledge_type")}


def test_salient_object_span_from_triples(tmp_path):
    write_pools(tmp_path)
    seqs, pools = pools_of(tmp_path)
    assert pools["updated"] == ["u1"]  # u2 states no updated object of E3: skipped
    tok = tokenizer()
    u1 = seqs.set_index("seq_id").loc["u1"]
    marked = [tok.convert_ids_to_tokens(i) for i, m in zip(u1["ids"], u1["mask"]) if m]
    assert marked == ["w7"]  # the new object, not the subject mention (w2) nor the old object
    # subject: today's span (the updated mention, the second word) and no sequence skipped
    seqs_s, pools_s = pools_of(tmp_path, salient="subject")
    assert pools_s["updated"] == ["u1", "u2"]
    u1 = seqs_s.set_index("seq_id").loc["u1"]
    assert [tok.convert_ids_to_tokens(i) for i, m in zip(u1["ids"], u1["mask"]) if m] == ["w2"]
    with pytest.raises(Exception, match="--corpus"):
        profile.diagnostic_sequences(profile.with_defaults({"control": "base"}), tmp_path / "tokens", None, tok,
                                     model_dir=tmp_path / "base", tagged=tmp_path / "tagged")


def test_new_pool_subject_and_infoboxes(tmp_path):
    write_pools(tmp_path)
    seqs, pools = pools_of(tmp_path)
    assert pools["new"] == ["n1"]  # n2 updates the known E2 (to the new E0): left out; nb is an infobox
    assert "b2" not in pools["control"] and set(pools["control"]) == {"b0", "b1"}
    assert dict(zip(seqs["seq_id"], seqs["entity"]))["n1"] == "E0"
    _, any_pool = pools_of(tmp_path, new_pool="any")
    assert any_pool["new"] == ["n1", "n2"]
    _, kept = pools_of(tmp_path, new_pool="any", infoboxes="keep")
    assert kept["new"] == ["n1", "n2", "nb"] and "b2" in kept["control"]


def test_entity_bootstrap_moves_clusters_together():
    rng = np.random.default_rng(0)
    # two entities: every row of entity a is 1, of b is 3; a row bootstrap mixes them, a
    # cluster bootstrap draws whole entities, so its means are sums of whole clusters
    x = np.array([[1.0]] * 3 + [[3.0]] * 5)
    labels = ["a"] * 3 + ["b"] * 5
    means = profile.bootstrap_means(x, labels, 400, rng)[:, 0]
    possible = {1.0, 3.0, (3 * 1 + 5 * 3) / 8}  # aa, bb, ab
    assert all(min(abs(m - p) for p in possible) < 1e-12 for m in means)
    assert len(set(np.round(profile.bootstrap_means(x, list("abcdefgh"), 400, rng)[:, 0], 9))) > 3
    # through the stage's table: r's interval by entity is wider than by sequence when
    # sequences of one entity are alike
    rows = []
    for kt, base in (("new", 2.0), ("control", 1.0)):
        for e in range(6):
            level = base * (1 + 0.5 * rng.standard_normal())
            for s in range(8):
                rows.append({"seq_id": f"{kt}{e}_{s}", "knowledge_type": kt, "entity": f"{kt}{e}",
                             "granularity": "block", "unit": "block.0", "layer": 0,
                             "norm": abs(level + 0.01 * rng.standard_normal())})
    norms = pd.DataFrame(rows)
    by_e = profile.relative_norms(norms, 500, 0, "entity").iloc[0]
    by_s = profile.relative_norms(norms, 500, 0, "sequence").iloc[0]
    assert by_e["rel"] == by_s["rel"] and by_e["hi"] - by_e["lo"] > 1.5 * (by_s["hi"] - by_s["lo"])


def synthetic_norms(rng, n_units=6, n_ent=12, per=3, shift=0.0):
    """Norms of new, updated and control sequences; updated's last unit `shift` higher."""
    rows = []
    for kt in ("new", "updated", "control"):
        for e in range(n_ent):
            eff = 0.2 * rng.standard_normal(n_units)
            for s in range(per):
                v = 1.0 + eff + 0.2 * rng.standard_normal(n_units)
                if kt == "updated":
                    v[-1] += shift
                for u in range(n_units):
                    rows.append({"seq_id": f"{kt}{e}_{s}", "knowledge_type": kt, "entity": f"{kt}{e}",
                                 "granularity": "block", "unit": f"block.{u}", "layer": u, "norm": abs(v[u])})
    return pd.DataFrame(rows)


def test_simultaneous_band_contains_pointwise():
    rng = np.random.default_rng(1)
    rel = profile.relative_norms(synthetic_norms(rng), 1000, 0, "entity")
    for c in ("d", "d_lo", "d_hi", "d_slo", "d_shi"):
        assert rel[c].notna().all(), c
    assert ((rel["d_shi"] - rel["d_slo"]) >= (rel["d_hi"] - rel["d_lo"])).all()
    assert ((rel["d_slo"] <= rel["d"]) & (rel["d"] <= rel["d_shi"])).all()
    # the pure band: one unit, the max-|t| quantile equals the |t| quantile: width ~ pointwise
    boot = rng.standard_normal((4000, 1))
    lo, hi = profile.simultaneous_band(boot, np.zeros(1))
    assert abs(hi[0] - 1.96) < 0.1 and abs(lo[0] + 1.96) < 0.1
    lo8, hi8 = profile.simultaneous_band(rng.standard_normal((4000, 8)), np.zeros(8))
    assert (hi8 > 2.5).all() and (lo8 < -2.5).all()  # 8 independent units: wider than 1.96


def test_permutation_test_null_and_planted():
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(40):  # same distribution: p about uniform
        n = synthetic_norms(rng, n_ent=8, per=2)
        t = profile.tests_of(n, profile.with_defaults({"permutations": 99, "seed": 0}))["new_vs_updated"]
        ps.append(t["p_value"])
    ps = np.array(ps)
    assert 0.3 < ps.mean() < 0.7 and (ps < 0.05).mean() <= 0.15
    planted = synthetic_norms(rng, shift=1.0)
    t = profile.tests_of(planted, profile.with_defaults({"permutations": 199, "seed": 0}))["new_vs_updated"]
    assert t["available"] and t["p_value"] <= 0.01 and t["observed"] > 0.5
    assert t["p_value"] >= 1 / 200  # p = (1 + #) / (1 + permutations) is never 0
    # the shape statistic sees it too (a single unit raised changes the normalised profile)
    assert t["shape_p_value"] <= 0.05
    # exchanging entities: 12 clusters a pool, not 36 sequences
    assert t["n_clusters"] == {"new": 12, "updated": 12} and t["n_sequences"] == {"new": 36, "updated": 36}
    again = profile.tests_of(planted, profile.with_defaults({"permutations": 199, "seed": 0}))
    assert again["new_vs_updated"] == t  # seeded


def test_tests_json_written(tmp_path):
    write_pools(tmp_path)
    params = {"n_sequences": 10, "batch_size": 4, "seq_len": 8, "bootstrap": 30, "permutations": 20,
              "control": "base", "new_pool": "any", "bootstrap_unit": "sequence"}
    profile.run(params, model=tmp_path / "base", tokens=tmp_path / "tokens", probes=tmp_path / "none",
                out=tmp_path / "profile", tagged=tmp_path / "tagged", corpus=tmp_path / "corpus")
    import json
    tests = json.loads((tmp_path / "profile" / "tests.json").read_text())
    t = tests["new_vs_updated"]
    assert set(t) == {"available", "reason", "test", "granularity", "units", "statistic", "observed", "p_value",
                      "shape_statistic", "shape_observed", "shape_p_value", "permutations", "seed",
                      "exchange_unit", "n_sequences", "n_clusters"}
    assert t["available"] and t["statistic"] == "max_u |r_new - r_updated|" and t["permutations"] == 20
    assert t["units"] == ["block.0", "block.1"] and t["exchange_unit"] == "sequence"
    assert t["n_sequences"] == {"new": 2, "updated": 1} and 1 / 21 <= t["p_value"] <= 1
    assert tests["intervals"]["kind"] == "simultaneous max-|t| over units" and tests["intervals"]["n_units"] == 2
    assert tests["intervals"]["level"] == 0.95 and tests["intervals"]["bootstrap"] == 30
    norms = pd.read_parquet(tmp_path / "profile" / "norms.parquet")
    assert dict(zip(norms["seq_id"], norms["entity"]))["u1"] == "E2"
    rel = pd.read_csv(tmp_path / "profile" / "relative.csv")
    assert {"lo", "hi", "d_lo", "d_hi", "d_slo", "d_shi"} <= set(rel.columns)
    # an empty pool: no test, and why
    empty = profile.tests_of(norms[norms["knowledge_type"] != "new"], profile.with_defaults({}))["new_vs_updated"]
    assert empty["available"] is False and "new" in empty["reason"] and empty["p_value"] is None

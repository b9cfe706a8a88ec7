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

"""`gradloc attention` and the `augment` method part: the paper's score (attention
received from later tokens) on a hand-built pattern and against the naive computation,
not constant across texts (the released code's bug), the tokenizer check, the stage's
files, and token-dropout copies (determinism, protected tokens, equal-rate controls,
training with tgl_fp and LoRA)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from gradloc import attention, train
from gradloc.io import InputError
from gradloc.methods import augment, resolve_method
from gradloc.models import save_model
from helpers import char_tokenizer, make_tokens, tiny_gpt2, word_tokenizer, write_tagged

torch.set_num_threads(1)


def test_three_token_pattern_matches_a_hand_computation():
    # one layer, one head; rows are queries, each a softmax row of a causal model
    A = torch.tensor([[[[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.2, 0.3, 0.5]]]])
    total = attention.received(A, torch.ones(1, 3))
    assert torch.allclose(total, torch.tensor([[0.8, 0.3, 0.0]]))
    score = attention.normalise(total, n_layers=1, n_heads=1, lengths=torch.tensor([3]))
    # token 0: (0.6 + 0.2) / 2 later tokens; token 1: 0.3 / 1; token 2: no later token
    assert torch.allclose(score, torch.tensor([[0.4, 0.3, 0.0]]))
    # a padded query row (mask 0) gives nothing
    total = attention.received(A, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(total, torch.tensor([[0.6, 0.0, 0.0]]))


def naive_scores(model, ids, mask):
    """All layers' weights kept (output_attentions), the definition written out."""
    A = torch.stack(model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions)  # L,B,H,T,T
    out = torch.zeros(ids.shape, dtype=torch.float32)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        for j in range(n - 1):
            out[b, j] = A[:, b, :, j + 1:n, j].mean(dim=(0, 1)).sum() / (n - 1 - j)
    return out


@torch.no_grad()
def test_hooks_equal_the_naive_computation_with_padding():
    model = tiny_gpt2(50, n_layer=3, initializer_range=0.3, attn_implementation="eager").eval()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    hooks = attention.ReceivedAttention(model)
    got = hooks(model, ids, mask)
    hooks.remove()
    assert torch.allclose(got, naive_scores(model, ids, mask), atol=1e-6)


@torch.no_grad()
def test_score_is_not_constant_across_texts_unlike_the_released_code():
    model = tiny_gpt2(50, n_layer=2, initializer_range=0.5, attn_implementation="eager").eval()
    ids = torch.randint(1, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    A = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    released = torch.stack(A).sum(-1).mean(dim=(0, 2))  # rows summed over keys: 1 everywhere
    assert torch.allclose(released, torch.ones_like(released), atol=1e-5)
    hooks = attention.ReceivedAttention(model)
    ours = hooks(model, ids, mask)
    # the same position in different texts scores differently
    assert ours[:, :-1].std(dim=0).min() > 1e-3


@torch.no_grad()
def test_long_documents_are_scored_in_windows_with_leading_ids():
    model = tiny_gpt2(50, n_layer=2, initializer_range=0.3).eval()
    docs = [np.arange(1, 24) % 49 + 1, np.array([5, 6, 7])]
    got = attention.score_docs(model, docs, seq_len=10, batch_size=3, lead=[0], pad_id=0, device="cpu")
    hooks = attention.ReceivedAttention(model)
    for d, doc in enumerate(docs):
        for s in range(0, len(doc), 9):
            ids = torch.tensor([[0, *doc[s:s + 9]]])
            want = hooks(model, ids, torch.ones_like(ids))[0, 1:].numpy()
            assert np.allclose(got[d][s:s + 9], want, atol=1e-6)
    hooks.remove()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A large and a small model with one tokenizer, tagged text with mentions, the corpus'
    triples, tokens."""
    root = tmp_path_factory.mktemp("attn")
    save_model(tiny_gpt2(96, n_layer=3, initializer_range=0.2), char_tokenizer(), root / "base_model" / "model")
    save_model(tiny_gpt2(96, n_layer=1, seed=1), char_tokenizer(), root / "small_model" / "model")
    rows = [("base", 0, f"Base {i}: river {i % 3} is long.") for i in range(6)]
    rows += [("train", 1, f"New {i}: Alice works at Acme, since {2000 + i}.") for i in range(6)]
    rows += [("train", 2, "Later: Carol moved to Oslo.")]
    write_tagged(root / "tagged", [{"period": p, "split": s, "text": t} for s, p, t in rows],
                 mentions=pd.DataFrame({"seq_id": [f"s{i}" for i in range(6, 12)], "period": 1, "entity_id": "alice",
                                        "start": 7, "end": 12}))
    # Alice's employer in snapshot 1 is marked where a sequence mentions her; Bob's founding
    # year is not (he is not mentioned), nor Alice's T0 employer
    (root / "corpus").mkdir()
    pd.DataFrame({"snapshot": [0, 1, 1], "subject_id": ["alice", "alice", "bob"], "subject": ["Alice", "Alice", "Bob"],
                  "relation": ["employer", "employer", "founded"], "object": ["works", "Acme", "2000"]}).to_parquet(
        root / "corpus" / "triples.parquet")
    make_tokens(root / "base_model", root / "tagged", root / "tokens")
    attention.run({"batch_size": 4}, large=root / "base_model", small=root / "small_model",
                  tokens=root / "tokens", tagged=root / "tagged", corpus=root / "corpus", period=1,
                  out=root / "attention" / "P1")
    return root


def test_stage_writes_scores_and_marks_aligned_with_the_tokens(world):
    from gradloc.tokens import load

    toks = load(world / "tokens")
    meta = json.loads((world / "attention" / "P1" / "meta.json").read_text())
    rows = toks.select(period=1, split="train")
    assert meta["n_tokens"] == rows["length"].sum() and meta["n_docs"] == 6
    s = attention.load(world / "attention" / "P1", toks, 1)
    text = "New 0: Alice works at Acme, since 2000."
    assert "".join(chr(31 + t) for t in toks.docs_of(rows)[0]) == text
    marked = s["marked"][0].astype(bool)
    assert "".join(c for c, m in zip(text, marked) if m) == "AliceAcme"
    assert not np.allclose(s["large"][0], s["small"][0])
    with pytest.raises(InputError, match="period"):
        attention.load(world / "attention" / "P1", toks, 2)


def test_a_corpus_that_ships_probes_marks_mentions_only(world, tmp_path):
    """TemporalWiki's triples are its probe files: their objects would be test answers."""
    import shutil

    shutil.copytree(world / "corpus", tmp_path / "corpus")
    rows = pd.read_parquet(world / "tagged" / "sequences.parquet").iloc[6:7]
    text = rows["text"].iat[0]
    _, spans = attention.spans_of(rows, world / "tagged", tmp_path / "corpus", 1)
    assert sorted(text[a:b] for a, b in spans[0]) == ["Acme", "Alice"]
    (tmp_path / "corpus" / "probes_raw.parquet").write_bytes(b"")
    _, spans = attention.spans_of(rows, world / "tagged", tmp_path / "corpus", 1)
    assert [text[a:b] for a, b in spans[0]] == ["Alice"]


def test_the_old_probes_input_is_refused_naming_the_corpus(world, tmp_path):
    with pytest.raises(InputError, match="--probes is no longer read.*--corpus"):
        attention.run({}, large=world / "base_model", small=world / "small_model", tokens=world / "tokens",
                      tagged=world / "tagged", probes=world / "probes", period=1, out=tmp_path / "a")


def test_different_tokenizers_are_refused(world, tmp_path):
    save_model(tiny_gpt2(4), word_tokenizer(["<eos>", "<unk>", "a", "b"]), tmp_path / "other" / "model")
    with pytest.raises(InputError, match="different tokenizers"):
        attention.load_pair(world / "base_model", tmp_path / "other")


# --- augment --------------------------------------------------------------------------------

AUG = {"kind": "attention_contrast", "copies": 4, "alpha": 0.7, "beta": 0.05}


def toy(n=60, seed=0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(1, 96, n)
    return doc, rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)


def test_keep_probability_follows_the_rank_of_the_contrast():
    p = augment.keep_probabilities(np.array([0.1, 0.9, 0.5]), 0.7, 0.05)
    assert np.allclose(p, [0.7 * np.exp(-0.1) + 0.3, 1.0, 0.7 * np.exp(-0.05) + 0.3])


def test_copies_are_deterministic_and_never_drop_protected_tokens():
    tok = char_tokenizer()
    protected = augment.protected_ids(tok)
    assert protected[tok.convert_tokens_to_ids(",")] and protected[0] and protected[1]  # ",", <eos>, " "
    assert not protected[tok.convert_tokens_to_ids("a")]
    doc, large, small = toy()
    scores = {"large": [large], "small": [small]}
    a, _ = augment.apply([doc], scores, AUG, protected, seed=0, period=1)
    b, _ = augment.apply([doc], scores, AUG, protected, seed=0, period=1)
    c, _ = augment.apply([doc], scores, AUG, protected, seed=1, period=1)
    assert len(a) == 5 and np.array_equal(a[0], doc)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a[1:], c[1:]))
    for copy in a[1:]:
        for t in doc[protected[doc]]:
            assert (copy == t).sum() == (doc == t).sum()


def test_random_drops_at_the_contrast_rate_and_repeat_matches_the_budget():
    protected = augment.protected_ids(char_tokenizer())
    docs, large, small = zip(*[toy(n, seed=n) for n in (20, 60, 200)])
    scores = {"large": list(large), "small": list(small)}
    tokens = {}
    for kind in ("attention_contrast", "random", "repeat", "large_only"):
        aug = {**AUG, "kind": kind, "copies": 50}
        out, masks = augment.apply(list(docs), scores, aug, protected, seed=0, period=1)
        tokens[kind] = sum(len(d) for d in out)
        if kind in ("attention_contrast", "random"):  # per document, the same expected drop rate
            rates = [np.mean([(~m[~protected[d]]).mean() for m in ms]) for d, ms in zip(docs, masks)]
            tokens[kind + "_rates"] = rates
    assert np.allclose(tokens["attention_contrast_rates"], tokens["random_rates"], atol=0.03)
    for kind in ("random", "repeat"):
        assert abs(tokens[kind] / tokens["attention_contrast"] - 1) < 0.05, tokens


def test_augment_is_a_method_part_that_composes():
    m = resolve_method({"layers": "tgl_fp", "lora": {}, "augment": {"kind": "random"}})
    assert m["augment"] == {"kind": "random", "copies": 10, "alpha": 0.7, "beta": 0.05}
    with pytest.raises(InputError, match="augment"):
        resolve_method({"augment": {"kind": "dropout"}})


@pytest.mark.parametrize("method", [{"augment": {"copies": 2}},
                                    {"layers": "tgl_fp", "lora": {"r": 2}, "augment": {"kind": "random", "copies": 2}}])
def test_training_with_copies_writes_the_inspection(world, tmp_path, method):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"granularity": "block", "units": ["block.1"], "rule": "mean",
                               "lr_multipliers": {"block.0": 1.0, "block.1": 1.0, "block.2": 1.0}}))
    params = {"name": "m", "common": {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "precision": "no"},
              "method": method}
    metrics = train.run(params, init=world / "base_model", tokens=world / "tokens", selection=sel, period=1,
                        seed=0, out=tmp_path / "out", attention=world / "attention" / "P1")
    plain = train.run({**params, "method": {}}, init=world / "base_model", tokens=world / "tokens", period=1,
                      seed=0, out=tmp_path / "plain")
    assert metrics["diff_blocks"] > plain["diff_blocks"]
    aug = metrics["augment"]
    assert aug["copies"] == 2 and len(aug["drop_rate_per_copy"]) == 2
    assert 0 < aug["drop_rate_per_copy"][0] < 1
    text = (tmp_path / "out" / "augment.md").read_text()
    assert "~~" in text and "**" in text
    with pytest.raises(InputError, match="--attention"):
        train.run(params, init=world / "base_model", tokens=world / "tokens", selection=sel, period=1, seed=0,
                  out=tmp_path / "x")


def test_report_has_a_token_dropout_section():
    from gradloc.report.markdown import augment_section

    a = {"kind": "random", "copies": 2, "drop_rate_per_copy": [0.4, 0.5], "keep_rate_marked": 0.5,
         "keep_rate_other": 0.6, "marked_enrichment": 0.9}
    text = augment_section([{"method": "r", "period": 1, "augment": a}, {"method": "full", "period": 1}])
    assert "## Token dropout" in text and "| r | 1 | random | 2 | 0.450 | 0.500 | 0.600 | 0.900 |" in text
    assert augment_section([{"method": "full", "period": 1}]) == ""

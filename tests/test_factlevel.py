"""Fact-level metrics (gradloc.factlevel): the candidates each probe is ranked among, the
ranking and efficacy against log-probs computed by hand with a tiny GPT-2, shortcuts,
and the negative control's permutation (methods/permute.py)."""

import math

import numpy as np
import pandas as pd
import torch
from test_evaluate import WORDS, direct_logprobs, ids

from gradloc import factlevel
from gradloc.evaluate import evaluate_model
from gradloc.methods import permute
from helpers import tiny_gpt2, word_tokenizer

torch.set_num_threads(1)


def probes_frame(rows):
    """rows: (period, set, subject_id, relation, object[, prefix])."""
    df = pd.DataFrame([r[:5] for r in rows], columns=["period", "set", "subject_id", "relation", "object"])
    df["prefix"] = [r[5] if len(r) > 5 else f"w2 w{3 + i % 30}" for i, r in enumerate(rows)]
    df["probe_id"] = [f"p{i}" for i in range(len(df))]
    df["subject"] = df["subject_id"]
    df["statement"] = df["prefix"] + " " + df["object"]
    df["paraphrase"], df["subject_status"] = "", "unknown"
    df["constant_object"] = factlevel.constant_objects(df)
    return df


WORLD = probes_frame(
    [(0, "unchanged", f"s{i}", "r", f"w{10 + i}") for i in range(8)]  # the T0 pool: w10..w17
    + [(1, "new", "n1", "r", "w20"), (1, "new", "n2", "r", "w21"), (1, "new", "n3", "r", "w22"),
       (1, "updated", "s0", "r", "w23"), (1, "outdated", "s0", "r", "w10"),
       (1, "unchanged", "s1", "r", "w11"), (1, "unchanged", "s2", "r", "w12"),
       (1, "new", "n1", "q", "w30"), (1, "new", "n2", "q", "w30"), (1, "new", "n3", "q", "w30")])


def test_candidates_are_same_relation_distinct_and_never_true():
    c = factlevel.candidates(WORLD, 1, k=6, seed=0)
    p1 = WORLD[WORLD["period"] == 1].set_index("probe_id")
    rel_objects = WORLD.groupby("relation")["object"].agg(set)
    for pid, g in c.groupby("probe_id"):
        probe = p1.loc[pid]
        assert g["gold"].sum() == 1 and g.loc[g["gold"], "candidate"].iat[0] == probe["object"]
        assert g["candidate"].is_unique
        assert set(g["candidate"]) <= rel_objects[probe["relation"]]  # same relation only
        assert len(g) <= 6
    upd = c[c["probe_id"] == p1.index[p1["set"] == "updated"][0]]
    assert "w10" in set(upd["candidate"])  # the replaced object is always a candidate
    assert (upd.loc[upd["candidate"] == "w10", "kind"] == "pair").all()
    new = c[c["probe_id"] == "p8"]  # n1's new fact: other new entities' objects are candidates
    assert {"w21", "w22"} & set(new.loc[new["kind"] == "same_set", "candidate"])
    out = c[c["probe_id"] == p1.index[p1["set"] == "outdated"][0]]
    assert "w23" in set(out["candidate"])  # the current object is the outdated probe's distractor
    # seeded: the same for every call, another seed draws differently
    assert c.equals(factlevel.candidates(WORLD, 1, k=6, seed=0))
    assert not c.equals(factlevel.candidates(WORLD, 1, k=6, seed=1))


def test_constant_objects_are_flagged():
    flags = WORLD.set_index("probe_id")["constant_object"]
    assert flags[["p15", "p16", "p17"]].all()  # every new q-fact is w30: a constant guess answers them
    assert not flags.drop(["p15", "p16", "p17"]).any()


def test_rank_and_chance():
    assert factlevel.rank_gold(np.array([0.5, 0.1, 0.2]), 0) == (1.0, 1.0)
    hits, rr = factlevel.rank_gold(np.array([0.1, 0.5, 0.2]), 0)
    assert hits == 0.0 and rr == 1 / 3
    assert factlevel.rank_gold(np.array([0.5, 0.5]), 0)[0] == 0.5  # a tie shares the rank
    h, m = factlevel.chance(10)
    assert h == 0.1 and math.isclose(m, sum(1 / i for i in range(1, 11)) / 10)


def test_ranking_and_efficacy_match_direct_forward():
    tokenizer = word_tokenizer(WORDS)
    model = tiny_gpt2(len(WORDS), n_positions=32).eval()
    period = WORLD[WORLD["period"] == 1].reset_index(drop=True)
    scores, summary = evaluate_model(model, tokenizer, period, [], 4, pool=WORLD, period=1, candidates=6)
    cands = factlevel.candidates(WORLD, 1, 6, 0)

    def norm(prefix, obj):
        p, o = ids(prefix), ids(obj)
        lp = direct_logprobs(model, p + o)
        return sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(o)) / len(o)

    for row in scores.itertuples():
        probe = period.set_index("probe_id").loc[row.probe_id]
        g = cands[cands["probe_id"] == row.probe_id]
        s = {c: norm(probe["prefix"], c) for c in g["candidate"]}
        gold = s[probe["object"]]
        assert row.hits1 == float(all(gold > v for c, v in s.items() if c != probe["object"]))
        assert math.isclose(row.rr, 1 / (1 + sum(v > gold for v in s.values())))
        assert row.n_candidates == len(g)
        if probe["set"] == "updated":
            assert math.isclose(row.margin, gold - s["w10"], abs_tol=1e-6)
            assert row.efficacy == (gold > s["w10"])
    facts = summary["facts"]
    assert facts["sets"]["new"]["n"] == 3 and facts["sets"]["new"]["n_constant"] == 3
    assert facts["efficacy"]["n"] == 1
    # chance is the mean of 1/n over the ranked probes
    new = scores[(scores["set"] == "new") & ~scores["constant_object"]]
    assert math.isclose(facts["sets"]["new"]["chance_hits1"], float((1 / new["n_candidates"]).mean()))


def test_majority_baseline_never_sees_the_answer():
    df = probes_frame([(1, "new", f"n{i}", "r", o) for i, o in enumerate(["w20", "w20", "w21", "w22"])])
    rows = pd.DataFrame({"probe_id": df["probe_id"], "hits1": 0.0, "rr": 0.1, "hits1_sum": 0.0, "rr_sum": 0.1,
                         "chance_hits1": 0.25, "chance_mrr": 0.5, "specificity": 0.0, "margin": np.nan,
                         "para_margin": np.nan})
    s = factlevel.summarize(df, rows)["sets"]["new"]
    # leave-one-out: each w20 probe is guessed w20 from the other; w21 and w22 are guessed w20
    assert s["majority_hits1"] == 0.5


def test_permutation_makes_every_distinct_fact_wrong():
    facts = pd.DataFrame({"subject_id": ["a", "b", "c", "d", "e"], "relation": ["r", "r", "r", "q", "q"],
                          "object": ["X", "Y", "Z", "2019", "2019"]})
    m = permute.wrong_objects(facts, seed=0)
    r = [m[(s, "r")] for s in "abc"]
    assert all(t != w for t, w in r)  # distinct objects: every fact made wrong
    assert sorted(w for _, w in r) == ["X", "Y", "Z"]  # the same objects, reassigned
    assert m[("d", "q")] == ("2019", "2019")  # a constant object cannot be made wrong
    assert m == permute.wrong_objects(facts, seed=0) and m != permute.wrong_objects(facts, seed=3)
    texts, n = permute.permute_texts(["a works at X. Xavier is not X.", "X alone"], [{"a"}, set()], m)
    wrong = m[("a", "r")][1]
    assert texts == [f"a works at {wrong}. Xavier is not {wrong}.", "X alone"] and n == 2


def test_lm_eval_harness_ranks_the_candidates_the_same():
    """Cross-check (issue 20 item 6): lm-evaluation-harness' multiple-choice scoring
    (`loglikelihood` of each candidate after the prefix, through HFLM) gives the same
    log-probs, so the same ranking, as ours."""
    import pytest

    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gradloc.scoring import score_pairs

    tokenizer = word_tokenizer(WORDS)
    model = tiny_gpt2(len(WORDS), n_positions=32, seed=3).eval()
    period = WORLD[WORLD["period"] == 1]
    cands = factlevel.candidates(WORLD, 1, 6, 0).merge(period[["probe_id", "prefix"]], on="probe_id")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(p, " " + c), idx=i)
            for i, (p, c) in enumerate(zip(cands["prefix"], cands["candidate"]))]
    theirs = np.array([ll for ll, _ in lm.loglikelihood(reqs)])
    ours, n = score_pairs(model, tokenizer, cands["prefix"], cands["candidate"])
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    for scores in (ours, theirs):
        cands[f"rank_{id(scores)}"] = pd.Series(scores / n).groupby(cands["probe_id"]).rank(ascending=False)
    assert (cands[f"rank_{id(ours)}"] == cands[f"rank_{id(theirs)}"]).all()


def test_score_pairs_equals_probe_scoring():
    """The candidates' scorer encodes and scores a (prefix, object) pair exactly as probe
    scoring does, an empty prefix (BOS/EOS start) included, whatever the batch."""
    from test_evaluate import make_probes, tiny

    from gradloc.scoring import score_pairs, score_probes

    model, tokenizer = tiny()
    probes = make_probes(model)
    probes.loc[0, "prefix"] = ""
    expect = score_probes(model, tokenizer, probes, batch_size=4, progress=False)
    for batch in (1, 5, 64):
        lp, n = score_pairs(model, tokenizer, probes["prefix"], probes["object"], batch)
        np.testing.assert_allclose(lp, expect["object_logprob"], atol=1e-5, rtol=0)
        assert (n == expect["object_tokens"]).all()


def test_fuar_is_empty_when_nothing_was_gained():
    """FUAR = forgotten / gained on net counts; float noise in the counts (hits@1 x n) is
    never a gain (it once gave FUARs of 1e17)."""
    from gradloc.report import facts

    def row(method, new, upd, unch):
        r = {"method": method, "seed": -1 if method == "base" else 0, "period": 1}
        for s in facts.SETS:
            r.update({f"{s}_{m}": math.nan for m in facts.METRICS})
        for s, (h, n) in {"new": new, "updated": upd, "unchanged": unch}.items():
            r[f"{s}_hits1"], r[f"{s}_n"] = h, n
        return r | {f"efficacy_{k}": math.nan for k in facts.EFFICACY}

    df = pd.DataFrame([row("base", (0.1, 10), (0.3, 10), (0.8, 10)),
                       row("noise", (0.1 + 1e-17, 10), (0.3, 10), (0.7, 10)),
                       row("learns", (0.3, 10), (0.3, 10), (0.7, 10))])
    out = facts.add_derived(df).set_index("method")
    assert math.isnan(out.loc["noise", "fuar"]) and out.loc["noise", "facts_forgotten"] == 1
    assert out.loc["learns", "facts_gained"] == 2 and out.loc["learns", "fuar"] == 0.5


def test_cached_candidates_equal_full_sequences():
    """Scoring candidates from their prefix's key/value cache gives the log-probs of the
    full prefix + object sequences: prefixes of several lengths, objects of one to four
    tokens, any batch, for GPT-2 (learned positions) and Llama (rotary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradloc.scoring import cached_object_logprobs, token_logprobs
    from helpers import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    prefixes = ["Ada works at", "Bo lives in", "Cy", "Dee was born in the city of"]
    objects = [" X", " Yz", " Quux", " Ab", " Abc"]
    groups = [(tok(p)["input_ids"], [tok(o)["input_ids"] for o in objects[: 2 + i]]) for i, p in enumerate(prefixes)]
    for model in (tiny_gpt2(len(tok), n_positions=64).eval(), llama.eval()):
        full, _ = token_logprobs(model, tok, [p + o for p, objs in groups for o in objs], batch_size=64)
        i, expect = 0, []
        for p, objs in groups:
            for o in objs:
                expect.append(full[i][len(p) - 1:])
                i += 1
        for batch in (1, 3, 64):
            got = [lp for g in cached_object_logprobs(model, groups, batch) for lp in g]
            assert [len(g) for g in got] == [len(e) for e in expect]
            for g, e in zip(got, expect):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)

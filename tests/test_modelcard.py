"""Model cards: a trained checkpoint folder holds a README.md that huggingface_hub's
ModelCard.load reads back, with the run's facts; the model-cards stage adds evaluation
results as model-index entries."""

import json

from huggingface_hub import ModelCard
from test_train import run, world  # noqa: F401  (the tiny world fixture)

from gradloc import modelcard, modelcards
from gradloc.io import write_json


def test_a_trained_checkpoint_has_a_card_huggingface_hub_reads(world, tmp_path):  # noqa: F811
    metrics = run(world, tmp_path / "out", {"layers": "all", "replay": {"ratio": 1.0}}, selection=False)
    card = ModelCard.load(tmp_path / "out" / "model" / "README.md")
    g = card.data.to_dict()["gradloc"]
    assert g["method"] == "m" and g["period"] == 1 and g["seed"] == 0
    assert g["parts"] == {"layers": "all", "replay": {"ratio": 1.0}}
    assert g["training_tokens"] == metrics["tokens"] > 0
    assert g["init"] == str(world / "base_model")
    assert g["command"]
    assert card.data.library_name == "transformers" and "gradloc" in card.data.tags
    assert f"| training tokens | {metrics['tokens']} |" in card.text
    assert "Not evaluated yet" in card.text


def test_model_cards_stage_adds_the_evaluation(world, tmp_path):  # noqa: F811
    run(world, tmp_path / "train", {"layers": "all"}, selection=False)
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    summary = {"method": "m", "seed": 0, "period": 1, "heldout_ppl": 12.5,
               "new": {"object_ppl": 30.25, "statement_ppl": 8.0, "top1": 0.125, "n": 8},
               "facts": {"candidates": 10, "sets": {"new": {"hits1": 0.375, "chance_hits1": 0.1, "n": 8}}}}
    (tmp_path / "eval").mkdir()
    write_json(summary, tmp_path / "eval" / "summary.json")
    modelcards.run({}, trains=[str(tmp_path / "train")], evals=[str(tmp_path / "eval")], out=tmp_path / "cards")
    card = ModelCard.load(tmp_path / "cards" / "m" / "seed0" / "P1" / "README.md")
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("new", "object_ppl")] == 30.25 and results[("new", "top1")] == 0.125
    assert results[(None, "perplexity")] == 12.5 and results[("new", "hits@1")] == 0.375
    assert card.data.to_dict()["gradloc"]["training_tokens"] == metrics["tokens"]
    assert "| new | 0.375 (0.1) | 30.25 | 8 | 0.125 | 8 |" in card.text
    assert f"| training tokens | {metrics['tokens']} |" in card.text


def test_the_origin_model_carries_down_the_periods(world, tmp_path):  # noqa: F811
    import shutil

    from gradloc import basemodel, train

    base = tmp_path / "base_model"
    shutil.copytree(world / "base_model", base)
    params = basemodel.with_defaults({"source": "pretrained", "name_or_path": "org/tiny-model", "teach_t0": True})
    modelcard.write(base / "model", modelcard.base_meta("base_model", params, {"steps": 3, "n_params": 10}, 99))
    assert ModelCard.load(base / "model" / "README.md").data.base_model == "org/tiny-model"
    common = {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "log_every": 2, "precision": "no"}
    for period, init in ((1, base), (2, tmp_path / "P1")):
        train.run({"name": "m", "common": common, "method": {}}, init=init, tokens=world / "tokens", period=period,
                  seed=0, out=tmp_path / f"P{period}")
    card = ModelCard.load(tmp_path / "P2" / "model" / "README.md")
    assert card.data.base_model == "org/tiny-model"
    assert "| base model | org/tiny-model |" in card.text and card.data.to_dict()["gradloc"]["period"] == 2

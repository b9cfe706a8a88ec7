"""benchmarks/ smoke test: every figure's code path at the tiniest sizes, the CSV's rows
and numeric targets, and the pure helpers (interval union, overhead shares, FLOP limit).
No timing is asserted: times on a shared machine say nothing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

from benchmarks import common, pipeline, run, scaling, targeted  # noqa: E402  (the checkout is on the path: pyproject.toml)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.csv"
    run.main(["--preset", "tiny", "--out", str(out), "--pipeline-config", "none"])
    with open(out) as f:
        assert f.readline().strip().split(",") == common.COLUMNS
    return common.read_csv(out)


def test_csv_has_every_figure_and_setting(results):
    assert {r["figure"] for r in results} == {1, 2, 3, 4, 5}
    settings = [r["setting"] for r in results]
    for B in (2, 4):
        assert f"ours / plain fwd+bwd, 2x32, B={B}, T=16" in settings
        assert f"naive loop / plain fwd+bwd, 2x32, B={B}, T=16" in settings
    for name in ("k=1/4 lower", "k=1/4 upper", "k=2/4 lower", "k=2/4 upper"):
        assert f"TGL-FP step / full step, {name}, 4x32, B=2, T=16" in settings
        assert f"analytical limit, {name}" in settings
        assert f"AdamW state / full, {name}" in settings
    assert any(s.startswith("gradloc train / HF Trainer tokens/s") for s in settings)
    assert any(s.startswith("snakemake -n, config/config.yaml") for s in settings)
    for kind in ("profile", "train step"):
        for axis in ("sequences", "model FLOPs/token"):
            assert f"{kind} growth exponent vs {axis}" in settings
    assert len({r["machine"] for r in results}) == 1 and "cores" in results[0]["machine"]


def test_targets_are_numbers(results):
    for r in results:
        assert r["op"] in ("", *common.OPS), r
        if r["op"]:
            assert r["target"] is not None and math.isfinite(r["target"]), r
        if r["op"] in ("within", "="):
            assert r["tol"] is not None, r
        assert r["met"] == common.meets(r), r
    limits = {r["setting"].split(", ")[1]: r["value"] for r in results if r["setting"].startswith("analytical limit")}
    for r in results:
        if r["setting"].startswith("TGL-FP step"):
            assert r["op"] == "within" and r["tol"] == 0.1
            assert r["target"] == pytest.approx(limits[r["setting"].split(", ")[1]], rel=1e-5)
    (tput,) = [r for r in results if r["setting"].startswith("gradloc train / HF Trainer")]
    assert (tput["op"], tput["target"]) == (">=", 1.0)


def test_ratios_and_times_are_finite_and_positive(results):
    for r in results:
        assert math.isfinite(r["value"]), r
        if r["unit"] in ("ratio", "s", "tokens/s", "MiB"):
            assert r["value"] > 0, r


def test_per_example_norms_match_the_naive_loop(results):
    errs = [r["value"] for r in results if r["setting"].startswith("ours vs naive")]
    assert errs and max(errs) < 1e-3


def test_optimizer_state_scales_with_trained_parameters(results):
    rows = [r for r in results if r["setting"].startswith("AdamW state / full")]
    assert len(rows) == 4
    for r in rows:
        assert r["op"] == "=" and r["met"] == "yes"
        assert r["value"] == pytest.approx(r["target"], rel=0.02)
    by_k = {r["setting"].split(", ")[1]: r["value"] for r in rows}
    assert by_k["k=2/4 lower"] == pytest.approx(2 * by_k["k=1/4 lower"], rel=0.02)


def test_meets():
    row = common.row
    assert common.meets(row(1, "a", 1.2, op="<=", target=1.5)) == "yes"
    assert common.meets(row(1, "a", 1.6, op="<=", target=1.5)) == "no"
    assert common.meets(row(1, "a", 0.75, op="within", target=0.7, tol=0.1)) == "yes"
    assert common.meets(row(1, "a", 0.8, op="within", target=0.7, tol=0.1)) == "no"
    assert common.meets(row(1, "a", 0.6, op="within", target=0.7, tol=0.1)) == "no"
    assert common.meets(row(1, "a", 8.1, op="~", target=8)) == ""
    assert common.meets(row(1, "a", 8.1)) == ""
    with pytest.raises(ValueError):
        row(1, "a", 1.0, op="within", target=1.0)  # no tolerance
    with pytest.raises(ValueError):
        row(1, "a", 1.0, op="≈", target=1.0)


def test_step_flops_limit():
    L, d, T, V = 8, 256, 128, 2048
    full = targeted.step_flops(L, d, T, V, None)
    forward = L * (24 * d * d + 4 * T * d) + 2 * d * V
    assert full == 3 * forward  # backward = 2 x forward when everything trains
    # top block only: forward + head input-grad + its input-grad + its weight-grad
    w, a = 24 * d * d, 4 * T * d
    assert targeted.step_flops(L, d, T, V, [L - 1]) == forward + 2 * d * V + (w + 2 * a) + w
    lower = targeted.step_flops(L, d, T, V, [0, 1]) / full
    upper = targeted.step_flops(L, d, T, V, [6, 7]) / full
    assert 1 / 3 < upper < lower < 1
    assert targeted.placements(8) == [("k=2/8 lower", [0, 1]), ("k=2/8 upper", [6, 7]),
                                      ("k=4/8 lower", [0, 1, 2, 3]), ("k=4/8 upper", [4, 5, 6, 7])]


def test_overhead_shares_from_job_intervals():
    assert pipeline.union_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert pipeline.union_seconds([]) == 0
    # 10 s wall; two overlapping jobs alive 1..6 and 2..9 (8 s), working 3..5 and 4..9 (6 s);
    # the first job's interpreter exits 1 s after its work
    jobs = [{"start": 1, "imported": 3, "end": 5, "exit": 6, "stage": "tokens", "torch": False},
            {"start": 2, "imported": 4, "end": 9, "stage": "train", "torch": True}]
    o = pipeline.overhead_shares(jobs, 0, 10)
    assert o["scheduler"] == pytest.approx(0.2)
    assert o["job_overhead"] == pytest.approx(0.2)
    assert o["outside"] == pytest.approx(0.4)
    assert o["startup_s"] == pytest.approx(2)
    assert o["teardown_s"] == pytest.approx(0.5)
    assert o["first_job_s"] == pytest.approx(1)
    assert o["overhead_share_of_job_time"] == pytest.approx(5 / 12)
    stages = pipeline.stage_summary(jobs)
    assert stages["tokens"] == {"jobs": 1, "startup_s": 2, "work_s": 2, "exit_s": 1, "torch": 0}
    assert stages["train"]["torch"] == 1 and stages["train"]["exit_s"] == 0


def test_loglog_slope():
    assert common.loglog_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1)
    assert common.loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2)
    assert scaling.MAX_EXPONENT == 1.1


def test_timing_shim_records_a_stage_process(tmp_path):
    env, log = pipeline.timing_shim(tmp_path)
    # a stage that fails fast on a missing input: exit code 2, still timed
    r = subprocess.run(["python", "-m", "gradloc", "select", "--profile", str(tmp_path / "none"),
                        "--out", str(tmp_path / "sel.json")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    (job,) = pipeline.read_job_log(log)
    assert job["stage"] == "select" and job["rc"] == 2 and job["torch"] is False
    assert job["start"] <= job["imported"] <= job["end"] <= job["exit"]


def test_base_model_sweep_runs_one_tiny_setting(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text('[{"steps": 3, "dpe": 1, "arch": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128}}]')
    out = tmp_path / "sweep.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "studies" / "base_model_sweep.py"), str(grid), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())
    # The held-out probes are those `gradloc probes` makes for T0 (the unworded half).
    assert row["steps"] == 3 and row["device"] == "cpu" and 300 < row["n_held"] < 600
    assert {"held", "docwording", "worded"} <= set(row) and all(0 <= row[k] <= 1 for k in ("held", "docwording", "worded"))
    # The recorded sweep covers the default config's setting.
    rows = [json.loads(line) for line in (ROOT / "benchmarks" / "measured" / "base_model_sweep.jsonl").read_text().splitlines()]
    default = [x for x in rows if x["steps"] == 1200 and x["dpe"] == 3 and "arch" not in x and "lr" not in x
               and "bs" not in x]
    assert default and all(x["held"] > 0.5 for x in default)


def test_flop_model_counts_the_matmuls_autograd_runs():
    """`step_flops`' structure, checked on autograd's backward: 4 weight matmuls per block;
    a trained block forms input- and weight-gradients, the blocks between the lowest
    trained one and the head input-gradients only, the blocks below it nothing."""
    from torch.profiler import profile

    from gradloc import engine, methods

    def backward_matmuls(blocks):
        model = common.gpt2(4, 32, 16)
        method, sel = ({"layers": "all"}, None) if blocks is None else (
            {"layers": "tgl_fp"}, {"granularity": "block", "units": [f"block.{i}" for i in blocks], "lr_multipliers": {}})
        prep = methods.prepare(model, method, sel)
        x, _ = common.random_batch(2, 16)
        loss = engine.causal_lm_loss(prep.model, {"input_ids": x, "labels": x})
        with profile() as p:
            loss.backward()
        return sum(e.name == "aten::mm" for e in p.events())

    assert backward_matmuls(None) == 4 * 4 * 2 + 2  # + head input-grad, tied embedding weight-grad
    for blocks in ([0], [3], [0, 1], [2, 3]):
        m = min(blocks)
        assert backward_matmuls(blocks) == 4 * (4 - m) + 4 * len(blocks) + 1, blocks


def test_camels_memory_case_runs_one_outer_step():
    """The CaMeLS memory benchmark's case: one outer step through `k` differentiable inner
    steps of the real meta-training code (the memory figure itself is not asserted)."""
    from benchmarks import camels_memory

    r = camels_memory.case("6x128", 2, "cpu", tokens=16)
    assert r["inner_steps"] == 2 and r["step_bytes"] >= 0
    assert 1.4e6 < r["params"] < 1.6e6  # GPT-2 6 x 128 with a 2048-token vocabulary

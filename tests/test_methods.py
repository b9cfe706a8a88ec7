"""How methods prepare a model: frozen layers, optimizer groups, LoRA, K-Adapter, RecAdam,
on tiny random GPT-2 / Llama models built here."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from gradloc import methods
from gradloc.io import InputError
from gradloc.methods import (
    KAdapterModel,
    anneal_lambda,
    lm_loss,
    lora_targets,
    make_optimizer,
    prepare,
    resolve_method,
    unit_multipliers,
)
from gradloc.models import layer_units, load_model
from helpers import char_tokenizer, make_subnet

torch.set_num_threads(1)

UNITS = ["embed", "block.0", "block.1", "block.2", "block.3", "final_norm"]
SELECTION = {"granularity": "block", "units": ["block.2", "block.3"],
             "lr_multipliers": {"block.0": 0.5, "block.1": 0.8, "block.2": 1.2, "block.3": 1.5}}


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def batch(seed=1, n=4, T=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 96, (n, T), generator=g)
    return x, x.clone()


def train_steps(prepared, steps=2, lr=1e-2):
    """A few plain optimizer steps on random tokens; returns the optimizer."""
    optimizer = make_optimizer(prepared, lr, 0.01)
    prepared.model.train()
    for s in range(steps):
        x, y = batch(seed=s)
        loss = lm_loss(prepared.model(input_ids=x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_resolve_method_fills_schema_defaults_and_rejects_bad_keys():
    m = resolve_method({"layers": "tgl_fp", "replay": {}, "lora": {"r": 8}})
    assert m["replay"] == {"ratio": 1.0}
    assert m["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention"}
    assert resolve_method({}) == resolve_method(None) == {"layers": "all"}  # absent parts stay off
    assert resolve_method({"recadam": {}})["recadam"] == {"anneal_k": 0.5, "anneal_t0": 250, "coeff": 5000}
    with pytest.raises(InputError, match=r"method: unknown key\(s\) \['lyers'\]"):
        resolve_method({"lyers": "all"})
    with pytest.raises(InputError, match="method.lora: .*'rank'"):
        resolve_method({"lora": {"rank": 4}})
    with pytest.raises(InputError, match="method.layers"):
        resolve_method({"layers": "tgl"})
    with pytest.raises(InputError, match="k_adapter"):
        resolve_method({"layers": "tgl_fp", "k_adapter": {}})
    with pytest.raises(InputError, match="one adapter"):
        resolve_method({"lora": {}, "k_adapter": {}})


def test_tgl_fp_freezes_others_and_gives_them_no_optimizer_state():
    model = gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = prepare(model, {"layers": "tgl_fp"}, SELECTION)
    units = layer_units(model, "block")
    trainable = {n for u in ("block.2", "block.3") for n in units[u]}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    optimizer = train_steps(prepared)
    params = dict(model.named_parameters())
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(params[n]) for n in trainable}
    assert {id(p) for p in optimizer.state} == in_groups
    for n, p in params.items():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_backward_never_runs_below_the_lowest_trainable_block():
    model = gpt2()
    prepare(model, {"layers": "tgl_fp"}, SELECTION)
    blocks = model.transformer.h
    called, input_requires_grad = [], {}
    for i, block in enumerate(blocks):
        block.register_full_backward_hook(lambda m, gi, go, i=i: called.append(i))
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: input_requires_grad.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True)
    x, y = batch()
    with warnings.catch_warnings():  # the hook warns that block 2's input needs no gradient: that's the point
        warnings.simplefilter("ignore", UserWarning)
        lm_loss(model(input_ids=x).logits, y).backward()
    assert sorted(set(called)) == [2, 3]
    assert input_requires_grad == {0: False, 1: False, 2: False, 3: True}
    assert model.transformer.wte.weight.grad is None and model.transformer.wpe.weight.grad is None


def test_alr_gives_each_unit_its_learning_rate():
    prepared = prepare(gpt2(), {"layers": "tgl_alr"}, {**SELECTION, "lr_multipliers": {
        **SELECTION["lr_multipliers"], "embed": 3.0}})
    optimizer = make_optimizer(prepared, 1e-3, 0.01)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["embed"] == pytest.approx(1e-3)  # embeddings keep the base rate
    for unit, mult in SELECTION["lr_multipliers"].items():
        assert lrs[unit] == pytest.approx(1e-3 * mult)
        assert lrs[unit + "/no_decay"] == pytest.approx(1e-3 * mult)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["block.0"] == 0.01 and decay["block.0/no_decay"] == 0.0
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in prepared.model.parameters())


def test_controls_pick_as_many_blocks_as_the_selection():
    sel = {**SELECTION, "units": ["embed", "block.1", "block.3"], "_source": "sel.json"}
    assert list(unit_multipliers("first", UNITS, sel, 0)) == ["embed", "block.0", "block.1"]
    assert list(unit_multipliers("last", UNITS, sel, 0)) == ["embed", "block.2", "block.3"]
    picks = {tuple(unit_multipliers("random", UNITS, sel, s)) for s in range(20)}
    assert all(len(p) == 3 and p[0] == "embed" for p in picks)
    assert len(picks) > 1, "different seeds pick different blocks"
    assert unit_multipliers("random", UNITS, sel, 5) == unit_multipliers("random", UNITS, sel, 5)


def test_subsets_are_deterministic_distinct_and_of_the_right_size():
    from math import comb

    from gradloc.methods.layers import subsets

    # more subsets than asked for: `count` seeded distinct ones, the same every time
    drawn = subsets(12, 4, 20, seed=0)
    assert drawn == subsets(12, 4, 20, seed=0) and drawn != subsets(12, 4, 20, seed=1)
    assert len(drawn) == 20 and len(set(drawn)) == 20
    assert all(len(s) == 4 and list(s) == sorted(set(s)) and all(0 <= i < 12 for i in s) for s in drawn)
    # a longer list starts with the same draws: null_0..null_19 keep their subsets when count grows
    assert subsets(12, 4, 30, seed=0)[:20] == drawn
    # C(L, k) <= count: every subset, in lexicographic order, whatever the seed
    every = subsets(4, 2, 20, seed=3)
    assert len(every) == comb(4, 2) == 6 and every[0] == (0, 1) and every[-1] == (2, 3)
    assert every == subsets(4, 2, 6, seed=9)
    with pytest.raises(InputError, match="subset.size"):
        subsets(4, 5, 20, seed=0)


def test_layers_subset_trains_one_null_subset_on_a_real_model():
    from gradloc.methods.layers import subsets

    sel = {**SELECTION, "_source": "sel.json"}  # tgl_fp picks 2 of the 4 blocks: C(4, 2) = 6 subsets
    method = {"layers": "subset", "subset": {"index": 0, "count": 20}}
    picked = {tuple(prepare(gpt2(), {**method, "subset": {"index": i, "count": 20}}, sel).trained_units)
              for i in range(6)}
    assert picked == {tuple(f"block.{b}" for b in s) for s in subsets(4, 2, 6, 0)}
    # size given: subsets of 3 blocks; the frozen blocks get no gradient
    prepared = prepare(gpt2(), {"layers": "subset", "subset": {"index": 1, "count": 2, "seed": 4, "size": 3}}, sel)
    assert len(prepared.trained_units) == 3
    trained = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert all(any(n.startswith(f"transformer.h.{u[6:]}.") for u in prepared.trained_units) for n in trained)
    with pytest.raises(InputError, match="method.subset"):
        resolve_method({"layers": "subset"})
    with pytest.raises(InputError, match="method.subset"):
        resolve_method({"layers": "random", "subset": {"index": 0}})


DENSITY = {0: 0.05, 1: 0.4, 2: 0.1, 3: 0.3}  # blocks 1 and 3 are the densest


def test_layers_subnet_trains_the_densest_blocks(tmp_path):
    model = gpt2()
    folder = make_subnet(model, tmp_path / "subnet", DENSITY)
    prepared = prepare(model, {"layers": "subnet"}, SELECTION, subnet=folder)
    assert prepared.trained_units == ["block.1", "block.3"]  # as many as TGL-FP's 2, the densest
    with pytest.raises(InputError, match=r"no subnetwork for outdated_P2 .*add 2 to subnet.periods"):
        prepare(gpt2(), {"layers": "subnet"}, SELECTION, subnet=folder, period=2)
    with pytest.raises(InputError, match="needs --subnet"):
        prepare(gpt2(), {"layers": "subnet"}, SELECTION)


@pytest.mark.parametrize("method", [{"mask": "subnet"}, {"mask": "subnet", "layers": "tgl_fp"},
                                    {"mask": "subnet", "recadam": {"anneal_t0": 0, "coeff": 1.0}}])
def test_mask_subnet_updates_only_the_masked_weights(tmp_path, method):
    model = gpt2()
    folder = make_subnet(model, tmp_path / "subnet", DENSITY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = prepare(model, method, SELECTION, subnet=folder)
    masks = methods.masking.load_masks(folder, 1, model)
    if method.get("layers") == "tgl_fp":
        masks = {n: m for n, m in masks.items() if n.startswith(("transformer.h.2.", "transformer.h.3."))}
    assert prepared.sparse.trainable() == sum(int(m.sum()) for m in masks.values())
    optimizer = train_steps(prepared, steps=3)  # weight decay 0.01 touches every entry the optimizer sees
    for n, p in model.named_parameters():
        if n not in masks:
            assert torch.equal(p, before[n]), n  # not a masked matrix (or outside tgl_fp's blocks): untouched
            continue
        m = masks[n]
        assert torch.equal(p[~m], before[n][~m]), n  # outside the mask: bit-identical
        assert (p[m] != before[n][m]).float().mean() > 0.9, n  # inside: trained
        if "exp_avg" in optimizer.state[p]:  # the moments see only the masked entries' gradients
            assert (optimizer.state[p]["exp_avg"][~m] == 0).all()


def test_mask_union_over_seeds_and_errors(tmp_path):
    model = gpt2()
    folder = make_subnet(model, tmp_path / "subnet", DENSITY)
    one = make_subnet(model, tmp_path / "one", DENSITY, seeds=(0,))
    union, first = methods.masking.load_masks(folder, 1, model), methods.masking.load_masks(one, 1, model)
    name = "transformer.h.1.mlp.c_fc.weight"
    assert (union[name] >= first[name]).all() and union[name].sum() > first[name].sum()
    assert union[name].float().mean() == pytest.approx(1 - 0.6 ** 2, abs=0.02)  # two masks at 0.4
    with pytest.raises(InputError, match="does not combine with lora"):
        resolve_method({"mask": "subnet", "lora": {}})
    (folder / "masks" / "outdated_P1_seed1.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"outdated_P1_seed1\.npz: not a readable subnet mask"):
        methods.masking.load_masks(folder, 1, model)


def test_selection_errors_name_the_file(tmp_path):
    path = tmp_path / "sel.json"
    path.write_text('{"granularity": "block", "units": ["block.9"], "lr_multipliers": {}}')
    with pytest.raises(InputError, match=r"sel\.json.*block\.9"):
        prepare(gpt2(), {"layers": "tgl_fp"}, path)
    with pytest.raises(InputError, match="needs a selection"):
        prepare(gpt2(), {"layers": "tgl_fp"}, None)


def test_module_granularity_freezes_inside_a_block():
    sel = {"granularity": "module", "units": ["block.3.mlp"], "lr_multipliers": {}}
    model = gpt2()
    prepared = prepare(model, {"layers": "tgl_fp"}, sel)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in dict(model.named_parameters()) if n.startswith("transformer.h.3.mlp.")}
    assert prepared.trained_units == ["block.3.mlp"]


def test_lora_targets_are_found_generically():
    model = gpt2()
    assert lora_targets(model, "attention") == [f"transformer.h.{i}.attn.{m}" for i in range(4)
                                                for m in ("c_attn", "c_proj")]
    assert lora_targets(model, "attention_qv") == [f"transformer.h.{i}.attn.c_attn" for i in range(4)]
    assert "transformer.h.0.mlp.c_fc" in lora_targets(model, "all_linear")
    llama = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                         intermediate_size=64, vocab_size=96))
    assert lora_targets(llama, "attention_qv") == [f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                                   for m in ("q_proj", "v_proj")]
    assert len(lora_targets(llama, "attention")) == 8


def lora_layers(model):
    """{name: the module it wraps} of every PEFT LoRA layer in `model`."""
    from peft.tuners.lora import LoraLayer

    return {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_lora_parameters_land_in_the_unit_of_the_block_they_wrap():
    model = gpt2()
    blocks = {f"block.{i}": set(block.modules()) for i, block in enumerate(model.transformer.h)}
    prepared = prepare(model, {"lora": {"r": 2, "targets": "all_linear"}})
    wrapped = lora_layers(prepared.model)
    assert len(wrapped) == 4 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each block
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    owner = {}  # LoRA parameter -> block whose module its layer wraps, by module identity
    for layer_name, base in wrapped.items():
        block = next(u for u, mods in blocks.items() if base in mods)
        for p in dict(prepared.model.named_modules())[layer_name].parameters():
            if p.requires_grad:
                owner[id(p)] = block
    assert {g["name"] for g in prepared.groups} == set(blocks)  # LoRA A/B are matrices: decayed
    for g in prepared.groups:
        assert g["params"] and all(owner[id(p)] == g["name"] for p in g["params"]), g["name"]
        assert all("lora_" in names[id(p)] for p in g["params"])
    assert sum(len(g["params"]) for g in prepared.groups) == 2 * len(wrapped)
    assert prepared.trained_units == list(blocks)

    model = gpt2()
    selected = set(model.transformer.h[2].modules()) | set(model.transformer.h[3].modules())
    prepared = prepare(model, {"layers": "tgl_fp", "lora": {"r": 2, "targets": "all_linear"}}, SELECTION)
    wrapped = lora_layers(prepared.model)
    assert len(wrapped) == 2 * 4 and all(base in selected for base in wrapped.values())
    assert [g["name"] for g in prepared.groups] == ["block.2", "block.3"]
    assert prepared.trained_units == ["block.2", "block.3"]


def test_lora_trains_adapters_in_selected_layers_and_merges_on_save(tmp_path):
    model = gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, {"layers": "tgl_fp", "lora": {"r": 2, "alpha": 4}}, SELECTION)
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".h.2." in n or ".h.3." in n) for n in trainable)
    train_steps(prepared, steps=3, lr=5e-2)
    x, _ = batch(seed=9)
    prepared.model.eval()
    with torch.no_grad():
        expected = prepared.model(input_ids=x).logits
    methods.save_checkpoint(prepared.model, char_tokenizer(), tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert not any("lora" in k for k in saved)
    merged, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        got = merged.eval()(input_ids=x).logits
        base_logits = gpt2().eval()(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-4)
    changed = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert changed == {f"transformer.h.{i}.attn.{m}.weight" for i in (2, 3) for m in ("c_attn", "c_proj")}


def test_recadam_anneal_and_pull_towards_the_initial_weights():
    assert anneal_lambda(250, 0.5, 250) == 0.5
    assert anneal_lambda(0, 0.5, 250) < 1e-50 and anneal_lambda(10**6, 0.5, 250) == 1.0
    init = {n: p.detach().clone() for n, p in gpt2().named_parameters()}

    def distance(coeff):
        prepared = prepare(gpt2(), {"recadam": {"coeff": coeff, "anneal_t0": 0, "anneal_k": 0.5}})
        train_steps(prepared, steps=3, lr=1e-2)
        return math.sqrt(sum(float((p.detach() - init[n]).pow(2).sum()) for n, p in prepared.model.named_parameters()))

    free, pulled, huge = distance(0.0), distance(10.0), distance(1e9)
    assert free > 0.1
    assert huge < 1e-3 * free
    assert huge < pulled < free


def test_k_adapter_trains_only_adapters_and_round_trips(tmp_path):
    model = gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, {"k_adapter": {"layers": [1, 2], "scale": 0.5}})
    assert isinstance(prepared.model, KAdapterModel)
    x, _ = batch(seed=9)
    with torch.no_grad():  # the zero-initialised up-projection starts from the base model
        torch.testing.assert_close(prepared.model.eval()(input_ids=x).logits, model.eval()(input_ids=x).logits)
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    train_steps(prepared, steps=3, lr=1e-2)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert prepared.model.adapters[1].up.weight.abs().sum() > 0
    prepared.model.eval()
    with torch.no_grad():
        expected = prepared.model(input_ids=x).logits
        assert not torch.allclose(expected, model(input_ids=x).logits)
    methods.save_checkpoint(prepared.model, char_tokenizer(), tmp_path / "model")
    loaded, _ = methods.load_checkpoint(tmp_path)  # a stage folder without model/ works too
    assert isinstance(loaded, KAdapterModel) and loaded.settings["layers"] == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, expected)
    # The next period continues the same adapters rather than adding new ones.
    again = prepare(loaded, {"k_adapter": {"layers": [1, 2], "scale": 0.5}})
    assert again.model is loaded


def test_lm_loss_weights():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    assert torch.allclose(lm_loss(logits, labels, torch.ones(2, 5)), lm_loss(logits, labels))
    w = torch.ones(2, 5)
    w[0] = 0  # the first row's tokens no longer count, but still divide (mean over tokens)
    ce = torch.nn.functional.cross_entropy(logits[1, :2], labels[1, 1:3], reduction="sum")
    assert torch.allclose(lm_loss(logits, labels, w), ce / 6)

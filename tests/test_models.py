"""Layer discovery on tiny random GPT-2, GPT-NeoX and Llama models built here."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
)

from gradloc.models import block_unit, classify_child, find_blocks, layer_units, load_model, save_model, unit_layer

torch.set_num_threads(1)

CONFIGS = {
    "gpt2": (GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64), "transformer.h"),
    "neox": (GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=64), "gpt_neox.layers"),
    "llama": (LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, vocab_size=100, max_position_embeddings=64), "model.layers"),
    "llama_tied": (LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True),
                   "model.layers"),
    "opt": (OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=100,
                      max_position_embeddings=64, word_embed_proj_dim=32), "model.decoder.layers"),
}


def build(kind):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[kind][0])


def assert_partition(model, units):
    names = [n for n, _ in model.named_parameters()]
    covered = [n for params in units.values() for n in params]
    assert sorted(covered) == sorted(names), "every parameter in exactly one unit"
    assert len(covered) == len(set(covered))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_find_blocks(kind):
    model = build(kind)
    name, blocks = find_blocks(model)
    assert name == CONFIGS[kind][1]
    assert len(blocks) == CONFIGS[kind][0].num_hidden_layers


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_layer_units_partition(kind, granularity):
    model = build(kind)
    units = layer_units(model, granularity)
    assert_partition(model, units)
    L = CONFIGS[kind][0].num_hidden_layers
    names = list(units)
    assert names[0] == "embed" and "final_norm" in names
    layers = [unit_layer(u, L) for u in names]
    assert layers == sorted(layers), "ordered bottom to top"
    if granularity == "block":
        assert [u for u in names if u.startswith("block.")] == [f"block.{i}" for i in range(L)]
    else:
        for i in range(L):
            assert {f"block.{i}.attn", f"block.{i}.mlp", f"block.{i}.norm"} <= set(names)
        assert not any(u.endswith(".other") for u in names)
        # module units refine block units
        blocks = layer_units(model, "block")
        for i in range(L):
            parts = [n for u in names if u.startswith(f"block.{i}.") for n in units[u]]
            assert sorted(parts) == sorted(blocks[f"block.{i}"])


@pytest.mark.parametrize("kind,has_head", [("gpt2", False), ("llama", True), ("llama_tied", False),
                                           ("neox", True)])
def test_lm_head_only_when_untied(kind, has_head):
    units = layer_units(build(kind), "block")
    assert ("lm_head" in units) == has_head


def test_gpt2_module_units_content():
    units = layer_units(build("gpt2"), "module")
    assert units["embed"] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert units["final_norm"] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert "transformer.h.1.attn.c_attn.weight" in units["block.1.attn"]
    assert set(units["block.0.norm"]) == {f"transformer.h.0.ln_{k}.{w}" for k in (1, 2) for w in ("weight", "bias")}


def test_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = build("gpt2")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    name, blocks = find_blocks(wrapped)
    assert name.endswith("transformer.h") and len(blocks) == 2
    units = layer_units(wrapped, "module")
    assert_partition(wrapped, units)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(any(n in units[u] for u in units if u.endswith(".attn")) for n in trainable)


def test_classify_child():
    assert classify_child("self_attn_layer_norm") == "norm"
    assert classify_child("input_layernorm") == "norm"
    assert classify_child("ln_1") == "norm"
    assert classify_child("self_attention") == "attn"
    assert classify_child("feed_forward") == "mlp"
    assert classify_child("fc1") == "mlp"
    assert classify_child("adapter") == "other"


def test_unit_layer():
    assert unit_layer("embed") == -1
    assert unit_layer("block.7") == 7 and unit_layer("block.7.mlp") == 7
    assert unit_layer("final_norm", 12) == 12 and unit_layer("lm_head", 12) == 12
    assert block_unit("block.3.attn") == "block.3" and block_unit("embed") == "embed"
    with pytest.raises(ValueError):
        unit_layer("final_norm")


def test_save_load_roundtrip(tmp_path):
    from helpers import char_tokenizer

    tokenizer = char_tokenizer()
    model = build("gpt2")
    save_model(model, tokenizer, tmp_path / "m")
    model2, tokenizer2 = load_model(tmp_path / "m")
    assert tokenizer2.pad_token == "<eos>"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, model2.eval()(ids).logits)

"""The QPiSSA residual survives transformers' 4-bit loading (BitsAndBytesConfig, bitsandbytes' CPU
backend) bit for bit: a tiny Llama built from a config, saved in bf16, loaded in NF4."""
import pytest
import torch

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from pissa_fast.quant import QuantSpec, qpissa_many  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    # give the weights a few dominant directions, as trained projections have
    for name, p in model.named_parameters():
        if name.endswith(("_proj.weight",)):
            u, v = torch.randn(p.shape[0], 2), torch.randn(2, p.shape[1])
            p.data += (0.05 * u @ v).to(p.dtype)
    return model


def load_4bit(path, spec):
    qc = transformers.BitsAndBytesConfig(**spec.bnb_config_kwargs(), bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16,
                                                         device_map="cpu")


def loaded_weights(model):
    import bitsandbytes as bnb

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out[name + ".weight"] = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    return out


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_residual_round_trips_through_transformers_4bit_loading(tmp_path, double_quant):
    model = tiny_llama()
    weights = {n: p.data for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    assert len(weights) == 2 * len(PROJ)
    outs = qpissa_many(weights, 4, 4, iters=2, double_quant=double_quant, inplace=True)
    model.save_pretrained(tmp_path)

    loaded = loaded_weights(load_4bit(tmp_path, QuantSpec(double_quant=double_quant)))
    assert set(loaded) == set(weights)
    for name, out in outs.items():
        assert loaded[name].dtype == torch.bfloat16
        same = torch.equal(loaded[name], out.residual)
        # bf16: exact with and without double quantization (its statistics settle, see nf4.py)
        assert same and out.exact, name


def test_base_plus_adapter_is_close_to_the_original_model(tmp_path):
    """The 4-bit residual plus the full-precision B A reproduces each original weight better than the
    4-bit weight alone (QLoRA), seen through the loaded model."""
    model = tiny_llama()
    originals = {n: p.data.clone() for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    outs = qpissa_many({n: p.data for n, p in model.named_parameters() if n in originals}, 8, 4, iters=3,
                       inplace=True)
    model.save_pretrained(tmp_path)
    loaded = loaded_weights(load_4bit(tmp_path, QuantSpec()))
    from pissa_fast.quant import qlora, quant_error

    for name, W in originals.items():
        e = quant_error(W, loaded[name], outs[name].A, outs[name].B)
        assert e == outs[name].error
        assert e < quant_error(W, qlora(W))

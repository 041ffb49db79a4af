"""The fine-tuning benchmark's quantized methods (qlora, qpissa) on weights whose in_features are not whole
NF4 blocks (64 x 96: bnb 0.50's native CPU dequantize_4bit mis-indexes that shape). They quantize through
pissa_fast.quant.nf4, whose dequantize follows the quantizer's block layout, so their base weights must be
what the quantizer's codes stand for (plain-torch reference), not what the native kernel returns."""
import pytest
import torch

from pissa_fast.finetune import methods as M
from test_finetune import _base_weights, _lora_layers, tiny_llama
from test_qpissa import reference_dequantize

pytest.importorskip("peft")
pytest.importorskip("transformers")
bnb_F = pytest.importorskip("bitsandbytes.functional")

# hidden 96: q/o 96x96, k/v 48x96, gate/up 64x96 (the shape of the bnb bug), down 96x64
DIMS = dict(hidden=96, intermediate=64)


def _reference_nf4(w):
    """nf4(w) by bnb's whole-tensor quantize_4bit, dequantized in plain torch by the quantizer's layout."""
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return reference_dequantize(packed, state)


def _rel(x, ref):
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def test_the_64x96_weight_is_one_that_bnbs_native_cpu_dequantize_gets_wrong():
    """Why this file exists; if a bnb release fixes its kernel this documents it (and the test can go)."""
    w = tiny_llama(40, **DIMS).model.layers[0].mlp.gate_proj.weight.detach()
    assert tuple(w.shape) == (64, 96)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert not torch.equal(bnb_F.dequantize_4bit(packed, state), reference_dequantize(packed, state))


def test_qlora_base_is_the_quantizers_nf4_on_a_64x96_weight():
    model, original = tiny_llama(40, **DIMS), _base_weights(tiny_llama(40, **DIMS))
    pm = M.get_method("qlora").build(model, M.AdapterSettings(r=2, lora_alpha=2.0))
    layers = _lora_layers(pm)
    assert any(tuple(layer.get_base_layer().weight.shape) == (64, 96) for layer in layers.values())
    for lname, layer in layers.items():
        base = layer.get_base_layer().weight.detach()
        assert torch.equal(base, _reference_nf4(original[lname].float())), lname


def test_qpissa_residual_is_nf4_exact_and_beats_qlora_on_a_64x96_weight():
    r = 4
    model, original = tiny_llama(40, **DIMS), _base_weights(tiny_llama(40, **DIMS))
    stats = {}
    pm = M.get_method("qpissa").build(model, M.AdapterSettings(r=r, lora_alpha=float(r), qpissa_iters=2,
                                                                 stats=stats))
    assert stats["nf4_exact"] is True
    for lname, layer in _lora_layers(pm).items():
        base = layer.get_base_layer().weight.detach()
        assert torch.equal(_reference_nf4(base), base), lname  # a 4-bit load gives R back bit for bit
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        err = _rel(base.double() + layer.scaling["default"] * b @ a, original[lname])
        assert err < _rel(_reference_nf4(original[lname].float()).double(), original[lname]), lname

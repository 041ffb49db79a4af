"""The quantized methods of the fine-tuning benchmark (qlora, qpissa): their state at step 0 on a tiny LLaMA
built from a config, and a two-step smoke run beside lora and pissa. Needs bitsandbytes (skipped without)."""
import json

import pytest
import torch

from pissa_fast.finetune import methods as M
from test_finetune import _base_weights, _lora_layers, _save_tiny, tiny_llama

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

# Whole NF4 blocks (64) per row, so that bnb's own 2-D dequantize_4bit (the reference below) is right on
# the CPU too: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128. Other widths: tests/test_qpissa_finetune.py.
QUANT_DIMS = dict(hidden=64, intermediate=128)


def tiny_quant_llama(vocab_size=40, seed=0):
    return tiny_llama(vocab_size, seed, **QUANT_DIMS)


@pytest.fixture(scope="module")
def tiny_quant_checkpoint(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_quant_llama"), **QUANT_DIMS)


def _bnb_nf4_round_trip(w):
    """bitsandbytes' quantize_4bit / dequantize_4bit on the whole tensor (not pissa_fast.quant's chunked
    wrapper): the reference for what the quantized methods' base weights must be."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return F.dequantize_4bit(packed, state)


def _rel(x, ref):
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))  # Frobenius for matrices


def _merged_model(peft_model, vocab_size=40):
    """A plain model whose targeted weights are base + scaling B A of `peft_model`'s layers (float64 sums)."""
    plain = tiny_quant_llama(vocab_size)
    with torch.no_grad():
        for name, layer in M.adapter_layers(peft_model):
            a = layer.lora_A["default"].weight.double()
            b = layer.lora_B["default"].weight.double()
            merged = layer.get_base_layer().weight.double() + layer.scaling["default"] * (b @ a)
            plain.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(merged.float())
    return plain


# A float32 forward of this 2-layer model in another (equally valid) summation order moves the logits by a few
# float32 eps of their size (2e-7 measured); 1e-4 leaves a ~400x margin and is still far below what NF4
# changes (5e-2 to 7e-2 here; the tests check it is above 1e-2).
LOGITS_RTOL = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.double()


def test_qlora_is_lora_over_the_nf4_base_and_starts_as_the_quantized_model():
    model, original = tiny_quant_llama(), _base_weights(tiny_quant_llama())
    lora_model = tiny_quant_llama()
    quantized = tiny_quant_llama()  # the model a 4-bit load gives: every targeted weight NF4-rounded, no adapter
    with torch.no_grad():
        for name in original:
            w = quantized.get_submodule(name).weight
            w.copy_(_bnb_nf4_round_trip(w.detach()))
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    stats = {}
    torch.manual_seed(0)
    pm = M.get_method("qlora").build(model, M.AdapterSettings(r=4, lora_alpha=4.0, stats=stats))
    torch.manual_seed(0)
    lora_pm = M.get_method("lora").build(lora_model, M.AdapterSettings(r=4, lora_alpha=4.0))
    layers, lora_layers = _lora_layers(pm), _lora_layers(lora_pm)
    errors = []
    for lname, layer in layers.items():
        base = layer.get_base_layer().weight.detach()
        assert torch.equal(base, quantized.get_submodule(lname).weight.detach()), lname
        errors.append(_rel(base.double(), original[lname]))
        # the adapter is LoRA's, draw for draw: only the base differs from the `lora` run
        assert torch.equal(layer.lora_A["default"].weight, lora_layers[lname].lora_A["default"].weight)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert stats["quantized_layers"] == 14
    assert stats["quant_error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-9)
    assert stats["quant_error_max"] == pytest.approx(max(errors), rel=1e-9)
    assert 0.05 < stats["quant_error_mean"] < 0.15  # NF4 on Gaussian weights: ~0.09 (1 of 16 levels per value)
    # B = 0 adds exact zeros: the output is the quantized model's, bit for bit
    out, want, ref = _logits(pm, ids), _logits(quantized, ids), _logits(tiny_quant_llama(), ids)
    assert torch.equal(out, want)
    assert _rel(out, ref) > 1e-2  # and quantization did change the model


def test_qpissa_starts_as_nf4_residual_plus_adapter_within_its_reported_error():
    """Step 0 of QPiSSA: every base weight is NF4-exact (a 4-bit load gives it back bit for bit), the model
    computes base(R) + scaling B A, and R + scaling B A is W up to exactly the error qpissa reports, which
    is below QLoRA's nf4(W) error (the paper's point), and so is the change of the model's output."""
    r = 4
    model, original = tiny_quant_llama(), _base_weights(tiny_quant_llama())
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    stats = {}
    # lora_alpha 2r: scaling 2, so the sqrt(scaling) split of the factors is exercised (the smoke run has scaling 1)
    settings = M.AdapterSettings(r=r, lora_alpha=2.0 * r, qpissa_iters=2, stats=stats)
    pm = M.get_method("qpissa").build(model, settings)
    errors, qlora_errors = [], []
    for lname, layer in _lora_layers(pm).items():
        base = layer.get_base_layer().weight.detach()
        assert torch.equal(_bnb_nf4_round_trip(base), base), lname
        assert layer.scaling["default"] == pytest.approx(settings.lora_alpha / r)
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        assert a.shape == (r, base.shape[1]) and b.shape == (base.shape[0], r)
        errors.append(_rel(base.double() + layer.scaling["default"] * b @ a, original[lname]))
        qlora_errors.append(_rel(_bnb_nf4_round_trip(original[lname].float()).double(), original[lname]))
        assert layer.lora_A["default"].weight.requires_grad and not layer.get_base_layer().weight.requires_grad
    # qpissa measures its error from the factors it returns; the layers hold them divided by sqrt(scaling)
    # in float32, which moves the error by ~eps relative.
    assert stats["quant_error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    assert stats["quant_error_max"] == pytest.approx(max(errors), rel=1e-5)
    assert stats["quantized_layers"] == 14 and stats["nf4_exact"] is True and stats["qpissa_iters"] == 2
    by_round = stats["quant_error_by_round"]
    assert len(by_round) == 2 and stats["quant_error_mean"] <= min(by_round) + 1e-12  # the best round is kept
    assert stats["quant_error_mean"] < sum(qlora_errors) / len(qlora_errors)
    # the model computes base(R) + adapter ...
    out, merged = _logits(pm, ids), _logits(_merged_model(pm), ids)
    torch.testing.assert_close(out, merged, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * float(merged.abs().max()))
    # ... which is the original model up to the quantization error, closer than QLoRA's start
    ref = _logits(tiny_quant_llama(), ids)
    quantized = tiny_quant_llama()
    with torch.no_grad():
        for name in original:
            quantized.get_submodule(name).weight.copy_(_bnb_nf4_round_trip(original[name].float()))
    assert 1e-2 < _rel(out, ref) < _rel(_logits(quantized, ids), ref)


def test_quantized_smoke_run_writes_their_figure_report_and_step0_facts(tiny_quant_checkpoint, tmp_path):
    """qlora and qpissa (opt-in) beside lora and pissa: two steps at ranks 1 and 2 on the 64-wide tiny model."""
    from pissa_fast.cli import main

    out = tmp_path / "out"
    methods = ["lora", "pissa", "qlora", "qpissa"]
    rc = main(["bench-finetune", "--model", tiny_quant_checkpoint, "--methods", ",".join(methods), "--steps", "2",
               "--batch-size", "2", "--ranks", "1,2", "--qpissa-iters", "2", "--out", str(out), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["curves"]) == set(methods) and res["partial"] is False
    s = res["settings"]
    assert s["qpissa_iters"] == 2 and "simulated" in s["quantization"] and "--qpissa-iters 2" in res["command"]
    for r in ("1", "2"):
        assert len({res["runs"][n][r]["trainable_params"] for n in methods}) == 1
        for n in methods:
            assert len(res["curves"][n][r]) == 2 and all(0 < v < 20 for v in res["curves"][n][r])
        ql, qp = res["runs"]["qlora"][r], res["runs"]["qpissa"][r]
        assert ql["quantized_layers"] == qp["quantized_layers"] == 14
        assert qp["quant_error_mean"] < ql["quant_error_mean"] and qp["nf4_exact"] is True
        assert len(qp["quant_error_by_round"]) == 2
    # QLoRA's step 1 is the quantized model (B = 0): the same at every rank, and not the full-precision loss
    assert res["curves"]["qlora"]["1"][0] == res["curves"]["qlora"]["2"][0] != res["curves"]["lora"]["1"][0]
    for png in ("fig2_1_loss_vs_step.png", "fig2_2_final_loss_vs_rank.png", "fig_qpissa_vs_qlora.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert not (out / "fig3_components.png").exists()
    report = (out / "report.md").read_text()
    assert "QPiSSA against QLoRA" in report and "fig_qpissa_vs_qlora.png" in report
    assert "## Quantized methods at step 0" in report and "| 2 | qpissa | 14 |" in report
    assert "**simulated**" in report and "r = 2, quantized: mean error" in report

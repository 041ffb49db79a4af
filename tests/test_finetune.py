"""The fine-tuning benchmark: task generator, adapter builders, and a two-step smoke run of the whole
command on a tiny LLaMA built from a config (never the downloaded model; nothing is downloaded)."""
import importlib.util
import json
import re

import pytest
import torch

from pissa_fast.finetune import methods as M
from pissa_fast.finetune import task

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------ tiny model

def char_tokenizer():
    """A character-level fast tokenizer (BPE with no merges) covering printable ASCII and newline."""
    from tokenizers import Tokenizer, decoders, models

    chars = ["<unk>", "<pad>", "</s>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # decode to the text itself, not characters joined by spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")


def tiny_llama(vocab_size, seed=0, hidden=32, intermediate=48):
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=1,
                                   eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


# The quantized methods need in_features that are whole NF4 blocks (64) on the CPU (see
# methods.cpu_blocksize_problem): q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128.
QUANT_DIMS = dict(hidden=64, intermediate=128)


def tiny_quant_llama(vocab_size=40, seed=0):
    return tiny_llama(vocab_size, seed, **QUANT_DIMS)


def _save_tiny(path, **dims):
    tok = char_tokenizer()
    tiny_llama(len(tok), **dims).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny_quant_checkpoint(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_quant_llama"), **QUANT_DIMS)


# ------------------------------------------------------------------------------------------- task

def test_examples_are_a_pure_function_of_n_and_seed():
    a = task.make_examples(300, seed=0)
    assert a == task.make_examples(300, seed=0)
    assert task.make_examples(40, seed=0) == a[:40]  # a longer run starts with the shorter run's data
    assert task.make_examples(300, seed=1) != a
    assert len({e.question for e in a}) > 250  # fresh problems, not a handful repeated
    # Pinned: the same text on every machine and Python version (random.Random with a seed is stable).
    assert a[0].question == "Lily shares 60 apples equally among 6 friends. How many apples does each friend get?"
    assert a[0].answer == "Each friend gets 60 / 6 = 10 apples. The answer is 10."
    assert task.make_examples(0) == []
    with pytest.raises(ValueError, match="n must be"):
        task.make_examples(-1)


def test_every_worked_answer_is_correct_arithmetic():
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}
    templates_seen = set()
    for ex in task.make_examples(600, seed=3):
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", ex.answer)
        assert steps, ex.answer
        for x, op, y, z in steps:
            assert ops[op](int(x), int(y)) == int(z), ex.answer
        assert ex.answer.endswith(f"The answer is {ex.value}.")
        assert int(steps[-1][3]) == ex.value and ex.value >= 0
        templates_seen.add(re.sub(r"\d+", "N", ex.answer.split(" ")[0]))
    assert len(templates_seen) >= 4


def test_encode_puts_the_loss_on_the_answer_tokens_only():
    tok = char_tokenizer()
    exs = task.make_examples(3, seed=5)
    batch = task.encode(exs, tok)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 3
    for i, ex in enumerate(exs):
        text = task.prompt(ex.question) + " " + ex.answer
        n = len(text) + 1  # characters + EOS
        assert mask[i].sum() == n and (mask[i, :n] == 1).all()
        assert tok.decode(ids[i, :n - 1]) == text and ids[i, n - 1] == tok.eos_token_id
        answer = labels[i][labels[i] != task.IGNORE_INDEX]
        assert tok.decode(answer[:-1]) == " " + ex.answer and answer[-1] == tok.eos_token_id
        assert (labels[i, :len(task.prompt(ex.question))] == task.IGNORE_INDEX).all()
        assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == task.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="at least one"):
        task.encode([], tok)


def test_batches_are_fresh_examples_in_order():
    tok = char_tokenizer()
    batches = task.make_batches(tok, steps=3, batch_size=2, seed=7)
    exs = task.make_examples(6, seed=7)
    assert len(batches) == 3
    for k, b in enumerate(batches):
        assert torch.equal(b["input_ids"], task.encode(exs[2 * k:2 * k + 2], tok)["input_ids"])
    with pytest.raises(ValueError, match="steps and batch_size"):
        task.make_batches(tok, steps=0, batch_size=2)


# ---------------------------------------------------------------------------------------- methods

def test_component_slice():
    assert M.component_slice(10, 3, "principal") == slice(0, 3)
    assert M.component_slice(10, 3, "middle") == slice(3, 6)
    assert M.component_slice(10, 3, "minor") == slice(7, 10)
    assert M.component_slice(4, 4, "middle") == slice(0, 4)
    with pytest.raises(ValueError, match=r"r must be in \[1, 4\]"):
        M.component_slice(4, 5, "minor")
    with pytest.raises(ValueError, match="which must be"):
        M.component_slice(4, 1, "largest")


def test_every_method_name_is_registered_and_unknown_ones_say_the_choices():
    assert tuple(M.METHODS) == M.ALL_METHOD_NAMES
    assert set(M.QUANT_METHODS) <= set(M.METHODS) and not set(M.QUANT_METHODS) & set(M.DEFAULT_METHODS)
    with pytest.raises(ValueError, match="choose from lora, pissa, pissa_middle, pissa_minor, qlora, qpissa"):
        M.get_method("dora")


def test_run_order_keeps_each_comparison_together():
    from pissa_fast.finetune.run import run_order

    order = run_order(["pissa_minor", "qpissa", "lora", "qlora", "pissa"], [1, 4])
    assert order == [("lora", 1), ("pissa", 1), ("lora", 4), ("pissa", 4), ("qpissa", 1), ("qlora", 1),
                     ("qpissa", 4), ("qlora", 4), ("pissa_minor", 1), ("pissa_minor", 4)]


def _base_weights(model):
    return {name: mod.weight.detach().double().clone() for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in M.LLAMA_TARGETS}


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, LoraLayer)}


@pytest.mark.parametrize("name, which", [("pissa", "principal"), ("pissa_middle", "middle"),
                                         ("pissa_minor", "minor")])
@pytest.mark.parametrize("alpha", [None, 8.0])
def test_component_adapters_keep_the_model_and_hold_the_chosen_components(name, which, alpha):
    """base + scaling * B A == W (the model is unchanged at step 0), and B A is the rank-r part of W made of
    the chosen singular triplets (checked against a float64 SVD)."""
    r = 3
    model = tiny_llama(40)
    original = _base_weights(model)
    settings = M.AdapterSettings(r=r, lora_alpha=float(r) if alpha is None else alpha, niter=None)
    peft_model = M.get_method(name).build(model, settings)
    layers = _lora_layers(peft_model)
    assert set(layers) == set(original)
    for lname, layer in layers.items():
        w = original[lname]
        scaling = layer.scaling["default"]
        assert scaling == pytest.approx(settings.lora_alpha / r)
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        base = layer.get_base_layer().weight.detach().double()
        tol = 50 * torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(w, 2)
        assert torch.linalg.matrix_norm(base + scaling * b @ a - w, 2) <= tol
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sl = M.component_slice(s.numel(), r, which)
        part = (u[:, sl] * s[sl]) @ vh[sl]
        # The components are determined up to a perturbation of relative size eps / gap (Davis-Kahan):
        # the float32 SVD of the PiSSA backend's exact path moves them by about eps * s_1 / gap.
        gaps = [s[sl.start - 1] - s[sl.start]] if sl.start > 0 else []
        gaps += [s[sl.stop - 1] - s[sl.stop]] if sl.stop < s.numel() else []
        tol_part = tol * (1 + s[0] / min(gaps)) if gaps else tol
        assert torch.linalg.matrix_norm(scaling * b @ a - part, 2) <= tol_part
        assert layer.lora_A["default"].weight.requires_grad and not layer.get_base_layer().weight.requires_grad


def test_exact_svds_are_shared_between_runs_and_recomputed_when_the_weight_changes(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*a, **k):
        calls.append(1)
        return real_svd(*a, **k)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    cache = {}
    for which in ("middle", "minor"):
        pm = M.get_method(f"pissa_{which}").build(tiny_llama(40), M.AdapterSettings(r=2, lora_alpha=2.0,
                                                                                       svd_cache=cache))
    assert len(calls) == 14 == len(cache)  # 2 layers x 7 projections, decomposed once for both methods
    model = tiny_llama(40, seed=1)  # other weights under the same names: recomputed, not reused
    M.get_method("pissa_minor").build(model, M.AdapterSettings(r=2, lora_alpha=2.0, svd_cache=cache))
    assert len(calls) == 28


def test_every_method_trains_the_same_parameters():
    counts = {}
    for name in M.METHODS:
        torch.manual_seed(0)
        pm = M.get_method(name).build(tiny_quant_llama(), M.AdapterSettings(r=2, lora_alpha=2.0, qpissa_iters=1))
        counts[name] = M.trainable_parameters(pm)
    # 2 layers x r (in + out) over q, k, v, o (64x64, 32x64, 32x64, 64x64), gate, up, down (128x64 x2, 64x128)
    per_layer = 2 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 3)
    assert set(counts.values()) == {2 * per_layer}, counts


def test_lora_starts_from_zero_b_and_gaussian_a():
    torch.manual_seed(0)
    model = tiny_llama(40)
    original = _base_weights(model)
    pm = M.get_method("lora").build(model, M.AdapterSettings(r=4, lora_alpha=4.0))
    for lname, layer in _lora_layers(pm).items():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.equal(layer.get_base_layer().weight.detach().double(), original[lname])
    a = torch.cat([layer.lora_A["default"].weight.detach().flatten() for layer in _lora_layers(pm).values()])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)  # peft's Gaussian init: N(0, 1/r)


# ------------------------------------------------------------------------------ quantized methods

def _bnb_nf4_round_trip(w):
    """bitsandbytes' quantize_4bit / dequantize_4bit on the whole tensor (not pissa_fast.quant's chunked
    wrapper): the reference for what the quantized methods' base weights must be."""
    F = pytest.importorskip("bitsandbytes.functional")
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
    pytest.importorskip("bitsandbytes")
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
    pytest.importorskip("bitsandbytes")
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


def test_quantized_methods_refuse_weights_that_bnb_dequantizes_wrongly_on_cpu():
    pytest.importorskip("bitsandbytes")
    for name in M.QUANT_METHODS:
        model = tiny_llama(40)  # in_features 32 and 48: not whole 64-blocks
        before = _base_weights(model)
        with pytest.raises(ValueError, match="in_features 32 is not a multiple of the NF4 blocksize 64"):
            M.get_method(name).build(model, M.AdapterSettings(r=2, lora_alpha=2.0))
        assert all(torch.equal(model.get_submodule(n).weight.double(), w) for n, w in before.items())


# -------------------------------------------------------------------------------------- smoke run

def test_two_step_smoke_run_writes_results_report_and_plots(tiny_checkpoint, tmp_path):
    from pissa_fast.cli import main

    out = tmp_path / "out"
    rc = main(["bench-finetune", "--model", tiny_checkpoint, "--steps", "2", "--batch-size", "2", "--ranks", "1,2",
               "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is False
    assert set(res["curves"]) == set(M.DEFAULT_METHODS)
    for name, per_rank in res["curves"].items():
        assert set(per_rank) == {"1", "2"}
        for r, losses in per_rank.items():
            assert len(losses) == 2 and all(isinstance(v, float) and 0 < v < 20 for v in losses), (name, r, losses)
            assert res["final_loss"][name][r] == pytest.approx(sum(losses) / 2)
    # every method starts from the same model output: step-1 losses agree up to float32 rounding
    for r in ("1", "2"):
        first = [res["curves"][n][r][0] for n in M.DEFAULT_METHODS]
        assert max(first) - min(first) < 1e-3, first
    for r in ("1", "2"):
        assert len({res["runs"][n][r]["trainable_params"] for n in M.DEFAULT_METHODS}) == 1
    s = res["settings"]
    assert (s["steps"], s["batch_size"], s["ranks"], s["lora_alpha"], s["niter"]) == (2, 2, [1, 2], "r", 4)
    assert res["environment"]["threads"] == 1 and "torch" in res["environment"]
    assert "bench-finetune" in res["command"] and "--steps 2" in res["command"]
    for png in ("fig2_1_loss_vs_step.png", "fig2_2_final_loss_vs_rank.png", "fig3_components.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    report = (out / "report.md").read_text()
    assert "fig2_1_loss_vs_step.png" in report and "| 2 | pissa_minor |" in report
    assert "What this shows and what it does not" in report and "Partial run" not in report


def test_quantized_smoke_run_writes_their_figure_report_and_step0_facts(tiny_quant_checkpoint, tmp_path):
    """qlora and qpissa (opt-in) beside lora and pissa: two steps at ranks 1 and 2 on the 64-wide tiny model."""
    pytest.importorskip("bitsandbytes")
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


def test_an_interrupted_run_keeps_the_finished_runs(tiny_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C during the third run: results.json, report.md and the plots hold the two finished ones."""
    from pissa_fast.cli import main
    from pissa_fast.finetune import run as R

    real = R.run_method
    seen = []

    def stop_on_third(*a, **k):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(R, "run_method", stop_on_third)
    out = tmp_path / "out"
    assert main(["bench-finetune", "--model", tiny_checkpoint, "--steps", "2", "--batch-size", "1", "--ranks", "1,2",
                 "--methods", "lora,pissa,pissa_minor", "--out", str(out), "--no-progress"]) == 130
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is True
    # LoRA and PiSSA at every rank come first (the headline figures), components after.
    assert {m: sorted(v) for m, v in res["curves"].items()} == {"lora": ["1"], "pissa": ["1"]}
    report = (out / "report.md").read_text()
    assert "Partial run" in report and "lora r=2, pissa r=2, pissa_minor r=1, pissa_minor r=2" in report
    assert (out / "fig2_1_loss_vs_step.png").exists()


def test_run_rejects_bad_arguments_before_writing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from pissa_fast.cli import main
    from pissa_fast.finetune.run import run_finetune
    from pissa_fast.quant import nf4

    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        main(["bench-finetune", "--model", tiny_checkpoint, "--methods", "lora,dora", "--out", str(out)])
    assert "unknown method 'dora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench-finetune", "--model", tiny_checkpoint, "--qpissa-iters", "0", "--out", str(out)])
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert main(["bench-finetune", "--model", tiny_checkpoint, "--methods", "lora,qlora", "--out", str(out),
                     "--no-progress"]) == 2
        assert "in_features 32 is not a multiple of the NF4 blocksize 64" in capsys.readouterr().err

    def no_bnb():
        raise ImportError(f"4-bit quantization needs bitsandbytes: {nf4.INSTALL_HINT}")

    monkeypatch.setattr(nf4, "bnb_functional", no_bnb)
    assert main(["bench-finetune", "--model", tiny_checkpoint, "--methods", "qpissa", "--out", str(out)]) == 2
    assert "pissa_fast[quant]" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(["bench-finetune", "--model", tiny_checkpoint, "--ranks", "0", "--out", str(out)])
    assert main(["bench-finetune", "--model", tiny_checkpoint, "--ranks", "64", "--out", str(out),
                 "--no-progress"]) == 2
    assert "exceeds the smallest targeted weight dimension 16" in capsys.readouterr().err
    assert main(["bench-finetune", "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "not a transformers checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr must be"):
        run_finetune(out=str(out), model=tiny_checkpoint, lr=-1.0)
    assert not out.exists()


def test_prepare_only_prints_the_checkpoint_folder(tiny_checkpoint, capsys):
    """The folder `pissa-fast bench --model "$(pissa-fast bench-finetune --prepare-only)"` reads."""
    import os

    from pissa_fast.cli import main

    assert main(["bench-finetune", "--prepare-only", "--model", tiny_checkpoint]) == 0
    assert capsys.readouterr().out.strip() == os.path.abspath(tiny_checkpoint)

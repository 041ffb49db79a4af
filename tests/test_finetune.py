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



def _save_tiny(path, **dims):
    tok = char_tokenizer()
    tiny_llama(len(tok), **dims).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"))



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
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for name in [n for n in M.METHODS if has_bnb or n not in M.QUANT_METHODS]:
        torch.manual_seed(0)
        # 64 wide: the quantized methods need whole 64-blocks of in_features (test_finetune_quant.py)
        pm = M.get_method(name).build(tiny_llama(40, hidden=64, intermediate=128),
                                      M.AdapterSettings(r=2, lora_alpha=2.0, qpissa_iters=1))
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

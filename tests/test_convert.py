"""PiSSA -> LoRA conversion: exact (rank 2r, as peft does) and truncated to rank k from the factors."""
import json
import math
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pissa_fast.convert import convert_to_lora, truncate
from pissa_fast.errors import CheckpointError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_truncate_is_the_best_rank_k_from_the_factors(k):
    m, n, r = 300, 200, 4
    g = torch.Generator().manual_seed(k)
    A1, A0 = torch.randn(r, n, generator=g), torch.randn(r, n, generator=g)
    B1, B0 = torch.randn(m, r, generator=g), torch.randn(m, r, generator=g)
    with _LargestTensor() as probe:
        A, B, lost, total = truncate(A1, B1, A0, B0, k, factor=0.5)
    assert probe.most <= m * 2 * r < m * n  # never an m x n matrix
    dW = 0.5 * (B1.double() @ A1.double() - B0.double() @ A0.double())
    U, S, Vh = torch.linalg.svd(dW)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    torch.testing.assert_close(B @ A, best, rtol=0, atol=1e-10 * S[0].item())
    assert math.isclose(lost, S[k:].square().sum().item(), rel_tol=1e-9, abs_tol=1e-9 * total)
    assert math.isclose(total, S.square().sum().item(), rel_tol=1e-9)
    # split evenly: A A^T == B^T B == diag(S_k)
    torch.testing.assert_close(A @ A.T, B.T @ B, rtol=1e-9, atol=1e-9 * S[0].item())


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import cli, load_pissa, logits, make_llama, tokens, train_adapter  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(source, init OUT, trained adapter, the trained PiSSA model's logits)."""
    base = tmp_path_factory.mktemp("convert")
    src = base / "model"
    make_llama(src)
    out = base / "out"
    assert cli(["init", src, out, "--r", 8, "--alpha", 16, "--target-modules", "q_proj,v_proj,up_proj"]) == 0
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out), out,
                                        subfolder="pissa_init", is_trainable=True)
    train_adapter(pm)
    pm.save_pretrained(base / "trained")
    return src, out, base / "trained", logits(pm.eval(), tokens()), pm


def test_exact_conversion_matches_peft(trained, tmp_path, capsys):
    src, out, tuned, ref, pm = trained
    lora_dir = tmp_path / "lora"
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tuned, lora_dir]) == 0
    text = capsys.readouterr().out
    assert "exact" in text and "rank 8 -> 16" in text and "--rank 8" in text
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["init_lora_weights"] is True
    assert cfg["base_model_name_or_path"] == str(src)  # the original model, as init was given it
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    lora = peft.PeftModel.from_pretrained(original, lora_dir).eval()
    torch.testing.assert_close(logits(lora, tokens()), ref, rtol=0, atol=1e-4)
    # the same tensors as peft's own conversion (which reads the initial adapter from a path)
    shutil.copytree(out / "pissa_init", tmp_path / "peft_init")
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    ours, theirs = load_file(lora_dir / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    # refuses to overwrite, then does with --overwrite
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tuned, lora_dir]) == 2
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tuned, lora_dir, "--overwrite"]) == 0


def test_rank_r_conversion(trained, tmp_path, capsys):
    src, out, tuned, ref, _ = trained
    lora_dir = tmp_path / "lora8"
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tuned, lora_dir, "--rank", 8]) == 0
    text = capsys.readouterr().out
    assert "rank 8 -> 8" in text and "dropped" in text and "worst layer" in text
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16  # the same scaling, 2
    adapter = load_file(lora_dir / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    # each layer's delta is the best rank-8 approximation of the trained delta, and the report says how much is lost
    init, tuned_w = load_file(out / "pissa_init" / "adapter_model.safetensors"), \
        load_file(tuned / "adapter_model.safetensors")
    res = convert_to_lora(out / "pissa_init", tuned, tmp_path / "again", rank=8)
    lost = total = 0.0
    for key in (k for k in adapter if k.endswith("lora_A.weight")):
        kb = key.replace("lora_A", "lora_B")
        dW = 2 * (tuned_w[kb].double() @ tuned_w[key].double() - init[kb].double() @ init[key].double())
        U, S, Vh = torch.linalg.svd(dW)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        torch.testing.assert_close(2 * adapter[kb].double() @ adapter[key].double(), best, rtol=0,
                                   atol=1e-5 * S[0].item())
        lost, total = lost + S[8:].square().sum().item(), total + S.square().sum().item()
    assert 0 < res.dropped < 1 and math.isclose(res.dropped, math.sqrt(lost / total), rel_tol=1e-6)
    # the rank-8 LoRA on the original model is close to the trained model, not equal
    lora = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), lora_dir)
    err = (logits(lora.eval(), tokens()) - ref).abs().max().item()
    assert 0 < err < 0.5 * (ref - logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(),
                                         tokens())).abs().max().item()
    # rank 2r keeps everything: the same function as the exact conversion
    full = tmp_path / "lora16"
    res16 = convert_to_lora(out / "pissa_init", tuned, full, rank=16)
    assert res16.dropped < 1e-6
    lora16 = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), full)
    torch.testing.assert_close(logits(lora16.eval(), tokens()), ref, rtol=0, atol=1e-4)
    with pytest.raises(CheckpointError, match="larger than 2r"):
        convert_to_lora(out / "pissa_init", tuned, tmp_path / "x", rank=17)


def test_rank_r_with_rslora_keeps_the_scaling(tmp_path):
    src = tmp_path / "model"
    make_llama(src)
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--alpha", 8, "--use-rslora", "--target-modules", "q_proj"]) == 0
    pm = load_pissa(out)
    train_adapter(pm)
    pm.save_pretrained(tmp_path / "trained")
    res = convert_to_lora(out / "pissa_init", tmp_path / "trained", tmp_path / "lora", rank=2)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 2
    assert math.isclose(cfg["lora_alpha"] / math.sqrt(2), 8 / math.sqrt(4))  # scaling kept
    assert res.new_r == 2 and 0 <= res.dropped < 1


def test_convert_bad_inputs(trained, tmp_path, capsys):
    src, out, tuned, _, _ = trained
    other = tmp_path / "other"
    assert cli(["init", src, other, "--r", 2, "--target-modules", "q_proj"]) == 0
    capsys.readouterr()
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", other / "pissa_init",
                tmp_path / "x"]) == 2
    assert "mismatched adapters: r" in capsys.readouterr().err
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tmp_path / "nowhere",
                tmp_path / "x"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    third = tmp_path / "third"  # same config, different layers
    assert cli(["init", src, third, "--r", 8, "--alpha", 16, "--target-modules", "q_proj,v_proj,down_proj"]) == 0
    capsys.readouterr()
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", third / "pissa_init",
                tmp_path / "x"]) == 2
    assert "different layers" in capsys.readouterr().err
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tuned, tmp_path / "x",
                "--rank", 0]) == 2
    assert "rank must be an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

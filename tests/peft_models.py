"""Shared pieces of the peft tests (test_peft_*.py): tiny models built from configs, inputs, and a
counter of the work pissa_fast did."""
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PISSA_FAST_PROGRESS", "0")

import torch  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
N_LAYERS = {"llama": 14, "gpt2": 8}  # LoRA layers of tiny() with targets(kind)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def tiny(kind="llama", dtype=torch.float32, seed=0):
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def targets(kind):
    return LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS


def tokens(n=2, t=8, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


def lora_layers(model, adapter="default"):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "r", {})}


def base_weight(layer):
    w = layer.get_base_layer().weight.detach()
    return w.t() if layer.fan_in_fan_out else w


def factors(layer, adapter="default"):
    return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()


def sign_aligned_diff(a1, b1, a2, b2):
    """max |difference| of two (lora_A, lora_B) pairs after flipping each singular pair of the first
    to agree in sign with the second."""
    sign = torch.sign((a1 * a2).sum(1) + (b1 * b2).sum(0))
    sign[sign == 0] = 1
    return max((a1 * sign[:, None] - a2).abs().max().item(), (b1 * sign - b2).abs().max().item())


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


class Counter:
    """What pissa_fast.core.decompose_many was asked to do: calls and weights."""

    def __init__(self):
        self.calls = 0
        self.weights = 0


@contextlib.contextmanager
def count_pissa_fast(monkeypatch, forbid_peft_svd=True):
    """Count decompose_many calls; with forbid_peft_svd, peft's own svd_lowrank raises (so a
    pissa_niter_N init that reaches peft's code fails loudly)."""
    import peft.tuners.lora.layer as lora_layer

    import pissa_fast.core as core

    counter = Counter()
    original = core.decompose_many

    def counting(weights, *args, **kwargs):
        counter.calls += 1
        counter.weights += len(weights)
        return original(weights, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("peft's own svd_lowrank ran")

    monkeypatch.setattr(core, "decompose_many", counting)
    if forbid_peft_svd:
        monkeypatch.setattr(lora_layer, "svd_lowrank", forbidden)
    yield counter

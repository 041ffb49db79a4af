"""Our versions of peft's own PiSSA tests (peft's tests/test_initialization.py: pissa init keeps the
output, PiSSA -> LoRA conversion with rank/alpha patterns and rslora, the rslora + pattern refusal, the
warning when a PiSSA adapter is loaded next to another), run with the pissa_fast backend enabled."""
import re
import warnings
from copy import deepcopy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft_models import count_pissa_fast, tiny  # noqa: E402

import pissa_fast.peft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MLP(nn.Module):
    """A linear layer between an embedding and a conv, like peft's test model (smaller)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.linear = nn.Linear(64, 96)
        self.conv2d = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        h = self.linear(self.embed(x))  # (n, t, 96)
        return self.conv2d(h.unsqueeze(1)).flatten(1)


@pytest.fixture(autouse=True)
def backend():
    pissa_fast.peft.enable()
    yield
    pissa_fast.peft.disable()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def data():
    return torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16"])
def test_pissa_init_keeps_the_output(model, data, monkeypatch, init):
    out = model(data)
    with count_pissa_fast(monkeypatch) as count:
        pm = get_peft_model(deepcopy(model), LoraConfig(init_lora_weights=init, target_modules=["linear"]))
    assert count.weights == 1
    torch.testing.assert_close(pm(data), out, rtol=0, atol=1e-5)


CONVERSION_CASES = {
    "plain": (dict(r=8), 8, 16),
    "rank_pattern": (dict(r=8, rank_pattern={"linear": 32}), 32, 64),
    "alpha_pattern": (dict(alpha_pattern={"linear": 5}), 8, 16),
    "rslora": (dict(r=8, use_rslora=True), 8, 16),
}


@pytest.mark.parametrize("case", list(CONVERSION_CASES))
def test_pissa_to_lora_conversion_same_output_after_loading(model, data, tmp_path, case):
    kwargs, r, r_converted = CONVERSION_CASES[case]
    out_base = model(data)
    pm = get_peft_model(deepcopy(model), LoraConfig(init_lora_weights="pissa", target_modules=["linear"], **kwargs))
    pm.peft_config["default"].init_lora_weights = True  # the initial adapter, saved before training
    pm.save_pretrained(tmp_path / "init-model")
    pm.peft_config["default"].init_lora_weights = "pissa"
    pm.base_model.linear.lora_B["default"].weight.data *= 2.0  # "training"
    out_pissa = pm(data)
    assert not torch.allclose(out_base, out_pissa, atol=1e-6, rtol=1e-6)

    pm.save_pretrained(tmp_path / "pissa-model")
    loaded = PeftModel.from_pretrained(deepcopy(model), tmp_path / "pissa-model")
    torch.testing.assert_close(loaded(data), out_pissa, rtol=1e-6, atol=1e-6)
    assert loaded.peft_config["default"].r == pm.peft_config["default"].r
    assert loaded.base_model.model.linear.lora_A["default"].weight.shape[0] == r
    assert not torch.allclose(model.linear.weight, loaded.base_model.model.linear.base_layer.weight, atol=1e-6)

    before = (list(pm.peft_config), pm.peft_config["default"].to_dict())
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init-model")
    assert (list(pm.peft_config), pm.peft_config["default"].to_dict()) == before
    converted = PeftModel.from_pretrained(deepcopy(model), tmp_path / "converted")
    torch.testing.assert_close(converted(data), out_pissa, rtol=1e-5, atol=1e-5)
    assert converted.base_model.model.linear.lora_A["default"].weight.shape[0] == r_converted
    torch.testing.assert_close(converted.base_model.model.linear.base_layer.weight, model.linear.weight, rtol=0, atol=0)
    if case == "rslora":
        assert converted.base_model.model.linear.scaling["default"] == pytest.approx(8 / (8 ** 0.5))


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pissa_conversion_with_rslora_and_pattern_raises(model, tmp_path, pattern):
    pm = get_peft_model(model, LoraConfig(init_lora_weights="pissa", target_modules=["linear"], r=8, use_rslora=True,
                                          **{pattern: {"linear": 2}}))
    pm.save_pretrained(tmp_path / "init-model")
    with pytest.raises(ValueError, match=re.escape("Passing `path_initial_model_for_weight_conversion` to `save_pretrained`")):
        pm.save_pretrained(tmp_path / "pissa-model", path_initial_model_for_weight_conversion=tmp_path / "init-model")


@pytest.mark.parametrize("pissa_first", [False, True])
def test_loading_pissa_next_to_another_adapter_warns(tmp_path, pissa_first):
    """PiSSA changes the base weights, so peft warns when its adapter is combined with another."""
    get_peft_model(tiny("llama"), LoraConfig(init_lora_weights=True)).save_pretrained(tmp_path / "plain")
    get_peft_model(tiny("llama"), LoraConfig(init_lora_weights="pissa")).save_pretrained(tmp_path / "pissa")
    first, second = ("pissa", "plain") if pissa_first else ("plain", "pissa")
    loaded = PeftModel.from_pretrained(tiny("llama"), tmp_path / first)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.load_adapter(tmp_path / second, adapter_name="other")
    msg = "PiSSA changes the base weights of the model and should thus not be used with other adapters"
    assert any(str(w.message).startswith(msg) for w in caught)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_lora_bias_with_pissa_is_refused_by_the_config(init):
    with pytest.raises(ValueError, match="The argument lora_bias=True is"):
        LoraConfig(target_modules=["linear"], lora_bias=True, init_lora_weights=init)


def test_embedding_target_keeps_peft_behaviour(model, data, monkeypatch):
    """peft gives an Embedding its plain LoRA init whatever init_lora_weights says; the backend does
    not change that: only the Linear goes to pissa_fast."""
    out = model(data)
    cfg = LoraConfig(init_lora_weights="pissa", target_modules=["linear", "embed"])
    with count_pissa_fast(monkeypatch) as count:
        ours = get_peft_model(deepcopy(model), cfg)
    assert count.weights == 1
    torch.testing.assert_close(ours(data), out, rtol=0, atol=1e-5)

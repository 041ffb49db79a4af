"""The baselines of the QPiSSA comparison (LoftQ, QLoRA) and `pissa-fast bench-qpissa`."""
import inspect
import itertools
import json
import os

import pytest
import torch

pytest.importorskip("bitsandbytes")

from pissa_fast.cli import main  # noqa: E402
from pissa_fast.quant import QuantSpec, loftq, loftq_reference, qlora, quant_error  # noqa: E402
from pissa_fast.quant import bench  # noqa: E402

from test_qpissa import llm_like  # noqa: E402

PEFT_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def peft_loftq_on(device: str):
    """peft's own loftq_init, with its hard-coded compute device replaced by `device` and nothing else
    changed, so the reference can be compared with peft's code on a machine without a GPU."""
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    assert PEFT_DEVICE_LINE in src, "peft's loftq_init changed: re-check loftq_reference against it"
    src = src.replace(PEFT_DEVICE_LINE, f'compute_device = "{device}"')
    ns = dict(vars(loftq_utils))
    exec(compile(src, loftq_utils.__file__, "exec"), ns)
    return ns["loftq_init"]


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("iters", [1, 3])
def test_reference_is_peft_loftq_bit_for_bit(qdtype, iters):
    W = llm_like(64, 128, qdtype, seed=1)  # a width bnb's CPU dequantize kernel handles (see quant/nf4.py)
    Q0, A0, B0 = peft_loftq_on("cpu")(W, num_bits=4, reduced_rank=4, num_iter=iters)
    Q, A, B = loftq_reference(W, 4, iters)
    assert Q.dtype == qdtype and torch.equal(Q, Q0) and torch.equal(A, A0) and torch.equal(B, B0)


def test_reference_rounds_hook_sees_what_fewer_rounds_return():
    W = llm_like(64, 96, seed=2)
    seen = {}
    loftq_reference(W, 4, 3, on_round=lambda i, Q, A, B: seen.__setitem__(i, (Q, A, B)))
    assert sorted(seen) == [1, 2, 3]
    for i in (1, 2):
        Q, A, B = loftq_reference(W, 4, i)
        assert all(torch.equal(x, y) for x, y in zip(seen[i], (Q, A, B)))
    errs = [quant_error(W, *seen[i]) for i in (1, 2, 3)]
    assert errs[2] < errs[0] < quant_error(W, qlora(W))


def test_loftq_dispatch_and_validation():
    W = llm_like(32, 48, seed=3)
    Q, A, B = loftq(W, 4, 1)  # CPU: the reference
    assert Q.shape == W.shape and A.shape == (4, 48) and B.shape == (32, 4)
    with pytest.raises(ValueError, match="r must be"):
        loftq(W, 33, 1)
    with pytest.raises(ValueError, match="iters must be"):
        loftq(W, 4, 0)
    with pytest.raises(TypeError, match="floating-point"):
        loftq(torch.zeros(4, 4, dtype=torch.int32), 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft's loftq_init runs on CUDA only")
def test_gpu_loftq_is_peft_and_matches_reference():
    from peft.utils.loftq_utils import loftq_init

    W = llm_like(64, 128, seed=4, device="cuda")
    Q0, A0, B0 = loftq_init(W, num_bits=4, reduced_rank=4, num_iter=2)
    Q, A, B = loftq(W, 4, 2)
    assert torch.equal(Q, Q0) and torch.equal(A, A0) and torch.equal(B, B0)
    Qr, Ar, Br = loftq_reference(W, 4, 2)
    assert quant_error(W, Qr, Ar, Br) == pytest.approx(quant_error(W, Q, A, B), rel=1e-3)


def test_qlora_is_bnb_fake_quant_in_the_weights_dtype():
    import bitsandbytes.functional as F

    W = llm_like(32, 64, seed=5)
    p, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert torch.equal(qlora(W), F.dequantize_4bit(p, st))
    assert torch.equal(qlora(W, QuantSpec(blocksize=128)), qlora(qlora(W, QuantSpec(blocksize=128)),
                                                                  QuantSpec(blocksize=128)))


# ------------------------------------------------------------------------------------ bench-qpissa

def _checkpoint(path):
    from safetensors.torch import save_file

    ws = {
        "model.layers.0.self_attn.q_proj.weight": llm_like(64, 64, seed=10),
        "model.layers.0.mlp.down_proj.weight": llm_like(64, 128, seed=11),
        "model.layers.1.self_attn.q_proj.weight": llm_like(64, 64, seed=12),
        "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=torch.bfloat16),  # not a projection
        "model.embed_tokens.weight": torch.randn(100, 64).to(torch.bfloat16),  # not a projection
    }
    save_file(ws, os.path.join(path, "model.safetensors"))
    return ws


def test_checkpoint_weights_streams_projections_in_layer_order(tmp_path):
    ws = _checkpoint(tmp_path)
    got = list(bench.checkpoint_weights(str(tmp_path), None))
    assert [k for k, _ in got] == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                                   "model.layers.1.self_attn.q_proj.weight"]
    assert all(torch.equal(w, ws[k]) for k, w in got)
    assert [k for k, _ in bench.checkpoint_weights(str(tmp_path), None, include="q_proj", limit=1)] == \
        ["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(FileNotFoundError):
        list(bench.checkpoint_weights(str(tmp_path / "nowhere"), None))


def test_bench_command_on_a_checkpoint(tmp_path, capsys):
    _checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["bench-qpissa", "--model", str(tmp_path), "-r", "4", "--iters", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "QPiSSA < LoftQ" in text and "model.layers.1.self_attn.q_proj.weight" in text
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert s["layers"] == 3 and len(s["rounds"]) == 2 and s["qpissa_exact"] == 3
    for row in s["rounds"]:
        assert row["qpissa_below_loftq"] == 3 and row["qpissa_below_qlora"] == 3
        assert row["qpissa_error"] < row["loftq_error"] < s["qlora_error"]
    for layer in res["layers"]:
        assert layer["qpissa_error_float64"] == layer["qpissa_error_reported"]
        assert layer["qpissa_errors"][1] <= layer["qpissa_errors"][0]
        assert len(layer["loftq_times"]) == 2 and layer["loftq_times"][0] <= layer["loftq_times"][1]
    for f in ("report.md", "error_vs_rounds.png", "error_per_matrix.png"):
        assert (out / f).stat().st_size > 0
    assert "![error_vs_rounds.png]" in (out / "report.md").read_text()


def test_synthetic_workload_and_fp4_needs_no_loftq(capsys):
    got = list(itertools.islice(bench.synthetic_weights("tiny", 1, torch.bfloat16, 0), 2))
    assert [k for k, _ in got] == ["layers.0.q_proj", "layers.0.k_proj"]
    assert got[1][1].shape == (128, 256) and got[1][1].dtype == torch.bfloat16
    assert main(["bench-qpissa", "--quant", "fp4"]) == 2
    assert "--no-loftq" in capsys.readouterr().err

"""What `pissa-fast bench` decomposes: synthetic weights shaped like a named model, one given shape,
or the real weights of a local safetensors checkpoint.

Synthetic weights (no download, deterministic for a given name and seed) are

    W = Q_m diag(s) Q_n^T,   s_i = i^-decay (i = 1 .. min(m, n)), decay = 0.35 by default,

with, for the "llm" spectrum, the top four values raised to 4x, 2.5x, 1.75x, 1.25x their power-law
value (a few large outliers, as in trained projections); "power" is the plain power law of
REFERENCE.md's test matrix. Q_m, Q_n are random orthogonal matrices built as

    Q = C D2 P C D1     (C the orthonormal DCT-II, D1, D2 random sign diagonals, P a random permutation)

so building W costs O(m n log(m n)) (four FFT passes over an m x n array) where the QR of Gaussian
matrices would cost O(m n^2) and dominate for 11008 x 4096 shapes. Two DCT rounds with random signs
and a permutation between them leave every singular vector delocalized (entries of size ~1/sqrt(m)),
like Haar-random ones. Since the sketches of both the peft path and pissa_fast are Gaussian, and a
Gaussian matrix is rotation invariant, their errors depend on the spectrum, not on which orthogonal
Q_m, Q_n are used. The scale (s_1 of the power law = 1) is REFERENCE.md's: with decay 0.35 a 4096 x
4096 weight has entries of RMS ~1.5e-3. W is built in float64 and rounded to the benchmark dtype; the
errors are measured against the exact SVD of the rounded W, never against the construction.
"""
from __future__ import annotations

import glob
import math
import os
import re
import zlib
from dataclasses import dataclass, field

import torch

from ..options import PISSA_SAFETENSORS_CODES, SAFETENSORS_DTYPES

# Per-layer projections of a few 7B-class models: name -> (out_features, in_features), and layers.
MODELS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    "llama-2-7b": (32, {
        "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
        "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}),
    "mistral-7b": (32, {
        "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}),
    "gemma-7b": (28, {
        "q_proj": (4096, 3072), "k_proj": (4096, 3072), "v_proj": (4096, 3072), "o_proj": (3072, 4096),
        "gate_proj": (24576, 3072), "up_proj": (24576, 3072), "down_proj": (3072, 24576)}),
    # Small ones, for quick runs and tests.
    "llama-small": (8, {
        "q_proj": (1024, 1024), "k_proj": (1024, 1024), "v_proj": (1024, 1024), "o_proj": (1024, 1024),
        "gate_proj": (2816, 1024), "up_proj": (2816, 1024), "down_proj": (1024, 2816)}),
    "tiny": (2, {
        "q_proj": (256, 256), "k_proj": (128, 256), "v_proj": (128, 256), "o_proj": (256, 256),
        "gate_proj": (1024, 256), "up_proj": (1024, 256), "down_proj": (256, 1024)}),
}

SPECTRA = ("llm", "power")
OUTLIERS = (4.0, 2.5, 1.75, 1.25)  # the "llm" spectrum's boost of s_1 .. s_4

# Names of the linear layers PiSSA targets in common transformers checkpoints (the last component
# before ".weight").
PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
    "gate_up_proj", "out_proj", "query", "key", "value", "query_key_value", "dense", "dense_h_to_4h",
    "dense_4h_to_h", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
    "Wqkv", "in_proj", "x_proj",
)
_PROJ_RE = re.compile(r"(?:^|\.)(" + "|".join(map(re.escape, PROJECTIONS)) + r")\.weight$")
_LAYER_RE = re.compile(r"\.(\d+)\.")

@dataclass
class MatrixSpec:
    """One benchmarked weight. `count` is how many weights of the model it stands for (1 for a single
    shape), used to weight errors and to estimate whole-model times."""

    name: str
    shape: tuple[int, int]
    count: int = 1
    source: str = "synthetic"            # "synthetic" | "checkpoint"
    seed: int | None = None              # synthetic: the construction's seed
    file: str | None = None              # checkpoint: the .safetensors file
    key: str | None = None               # checkpoint: the tensor's name
    dtype: torch.dtype | None = None     # checkpoint: its stored dtype
    stands_for: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "count": self.count, "source": self.source}
        if self.source == "synthetic":
            d["seed"] = self.seed
        else:
            d.update(file=self.file, key=self.key, stored_dtype=str(self.dtype).replace("torch.", ""))
        if self.stands_for:
            d["stands_for"] = self.stands_for
        return d


@dataclass
class Workload:
    kind: str                       # "model" | "shape" | "checkpoint"
    label: str                      # e.g. "llama-2-7b", "4096x4096", a path
    sampled: list[MatrixSpec]       # the matrices measured one by one
    every: list[MatrixSpec]         # every weight of the model (whole-model totals)
    spectrum: str = "llm"
    decay: float = 0.35

    @property
    def is_model(self) -> bool:
        return self.kind in ("model", "checkpoint")


def matrix_seed(name: str, seed: int) -> int:
    """The construction seed of the synthetic weight `name`: stable across runs and platforms."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def spectrum_values(k: int, spectrum: str = "llm", decay: float = 0.35, dtype=torch.float64) -> torch.Tensor:
    s = torch.arange(1, k + 1, dtype=dtype).pow(-float(decay))
    if spectrum == "llm":
        j = min(k, len(OUTLIERS))
        s[:j] *= torch.tensor(OUTLIERS[:j], dtype=dtype)
    elif spectrum != "power":
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    return s


def _dct_plan(N: int, device) -> tuple:
    """Index and twiddles for the orthonormal DCT-II of length N through one real FFT (Makhoul 1980):
    v = x[even indices, then odd ones reversed], V = rfft(v), X_k = scale_k Re(e^{-i pi k / 2N} V_k),
    with V_k = conj(V_{N-k}) for k > N/2."""
    order = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2).flip(0)]).to(device)
    h = N // 2 + 1
    k = torch.arange(N, dtype=torch.float64, device=device)
    scale = torch.full((N,), math.sqrt(2.0 / N), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1.0 / N)
    c, s = scale * torch.cos(math.pi * k / (2 * N)), scale * torch.sin(math.pi * k / (2 * N))
    j = torch.arange(N - 1, h - 1, -1, device=device)  # output columns N-1 .. h read V_1 .. V_{N-h}
    return order, h, c[:h], s[:h], c[j], s[j]


def _dct(v: torch.Tensor, plan) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim, of x given already reordered as v = x[:, order]."""
    _, h, c, s, c_hi, s_hi = plan
    N = v.shape[-1]
    V = torch.fft.rfft(v, dim=-1)
    a, b = V.real, V.imag
    out = torch.empty_like(v)
    torch.addcmul(a * c, b, s, out=out[:, :h])
    if N > h:
        a, b = a[:, 1:N - h + 1], b[:, 1:N - h + 1]
        out[:, h:] = (a * c_hi - b * s_hi).flip(-1)
    return out


def _mix_rows(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x Q^T, i.e. Q applied to every row of x (K x N, float64), for the random orthogonal
    Q = C D2 P C D1 of size N (see the module docstring). In place over row blocks of ~4M entries."""
    N = x.shape[-1]
    d1 = (torch.randint(0, 2, (N,), generator=gen) * 2 - 1).to(x.device, x.dtype)
    perm = torch.randperm(N, generator=gen).to(x.device)
    d2 = (torch.randint(0, 2, (N,), generator=gen) * 2 - 1).to(x.device, x.dtype)
    plan = _dct_plan(N, x.device)
    order = plan[0]
    # Fold the DCT's reordering into the signs and the permutation: one gather per round.
    d1o, perm_o, d2o = d1[order], perm[order], d2[order]
    step = max(1, (1 << 22) // max(1, N))
    for i in range(0, x.shape[0], step):
        blk = _dct(x[i:i + step].index_select(-1, order) * d1o, plan)
        x[i:i + step] = _dct(blk.index_select(-1, perm_o) * d2o, plan)
    return x


def synthetic_weight(m: int, n: int, seed: int, *, spectrum: str = "llm", decay: float = 0.35,
                     dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """W = Q_m diag(s) Q_n^T (m x n) in `dtype` on `device`; deterministic in (m, n, seed, spectrum,
    decay) up to the FFT's rounding on the device."""
    gen = torch.Generator().manual_seed(int(seed))
    k = min(m, n)
    s = spectrum_values(k, spectrum, decay).to(device)
    Xt = torch.zeros(k, n, dtype=torch.float64, device=device)
    Xt.diagonal().copy_(s)
    _mix_rows(Xt, gen)                   # (Q_n[:, :k] diag(s))^T, k x n
    Wt = torch.zeros(n, m, dtype=torch.float64, device=device)
    Wt[:, :k] = Xt.t()
    del Xt
    _mix_rows(Wt, gen)                   # W^T = Q_n [diag(s) 0] Q_m^T
    W = Wt.t().to(dtype).contiguous()
    del Wt
    return W


def named_model(name: str, seed: int, sample: str) -> tuple[list[MatrixSpec], list[MatrixSpec]]:
    """(sampled, every) for a named model. sample: "shapes" (one weight per distinct shape, from the
    middle layer), "projections" (one per projection, middle layer) or "all"."""
    layers, projs = MODELS[name]
    every = [MatrixSpec(f"{name}/layers.{i}.{p}", shape, 1, seed=matrix_seed(f"{name}/layers.{i}.{p}", seed))
             for i in range(layers) for p, shape in projs.items()]
    mid = layers // 2
    if sample == "all":
        return every, every
    if sample == "projections":
        return [MatrixSpec(f"{name}/layers.{mid}.{p}", shape, layers,
                           seed=matrix_seed(f"{name}/layers.{mid}.{p}", seed), stands_for=[p])
                for p, shape in projs.items()], every
    by_shape: dict[tuple[int, int], list[str]] = {}
    for p, shape in projs.items():
        by_shape.setdefault(shape, []).append(p)
    return [MatrixSpec(f"{name}/layers.{mid}.{ps[0]}", shape, layers * len(ps),
                       seed=matrix_seed(f"{name}/layers.{mid}.{ps[0]}", seed), stands_for=ps)
            for shape, ps in by_shape.items()], every


def checkpoint_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def checkpoint_model(path: str, sample: str) -> tuple[list[MatrixSpec], list[MatrixSpec]]:
    """(sampled, every) for the 2-D projection weights of a local safetensors checkpoint (a folder of
    *.safetensors shards or one file). Only headers are read here."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise RuntimeError("--model PATH reads safetensors checkpoints: pip install safetensors") from e
    files = checkpoint_files(path)
    if not files:
        raise ValueError(f"--model {path}: no *.safetensors files there")
    every = []
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                if not _PROJ_RE.search(key):
                    continue
                sl = h.get_slice(key)
                shape = tuple(sl.get_shape())
                code = sl.get_dtype()
                dt = SAFETENSORS_DTYPES[code][0] if code in PISSA_SAFETENSORS_CODES else None
                if len(shape) != 2 or dt is None or min(shape) < 1:
                    continue
                every.append(MatrixSpec(key, shape, 1, source="checkpoint", file=f, key=key, dtype=dt))
    if not every:
        raise ValueError(f"--model {path}: no 2-D float weights named like a projection "
                         f"(*.{{q_proj,k_proj,...,down_proj,...}}.weight) in {len(files)} file(s)")
    if sample == "all":
        return every, every

    def layer(s):
        mt = _LAYER_RE.search(s.key)
        return int(mt.group(1)) if mt else -1

    groups: dict = {}
    for s in every:
        g = _LAYER_RE.sub(".*.", s.key, count=1) if sample == "projections" else s.shape
        groups.setdefault(g, []).append(s)
    sampled = []
    for g, members in groups.items():
        members = sorted(members, key=layer)
        pick = members[len(members) // 2]
        labels = sorted({_LAYER_RE.sub(".*.", s.key, count=1) for s in members})
        sampled.append(MatrixSpec(pick.name, pick.shape, len(members), source="checkpoint", file=pick.file,
                                  key=pick.key, dtype=pick.dtype, stands_for=labels))
    return sampled, every


def materialize(spec: MatrixSpec, workload: Workload, dtype: torch.dtype | None, device) -> torch.Tensor:
    """The weight `spec` as a tensor on `device`: synthetic (in `dtype`, float32 if None) or read
    from its checkpoint (in `dtype`, its stored dtype if None)."""
    if spec.source == "synthetic":
        m, n = spec.shape
        return synthetic_weight(m, n, spec.seed, spectrum=workload.spectrum, decay=workload.decay,
                                dtype=dtype or torch.float32, device=device)
    from safetensors import safe_open

    with safe_open(spec.file, framework="pt") as h:
        w = h.get_tensor(spec.key)
    return w.to(device=device, dtype=dtype or w.dtype).contiguous()

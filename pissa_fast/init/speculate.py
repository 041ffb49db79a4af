"""Decomposing the likely targets while the plan is made.

Planning imports transformers and peft and builds the model skeleton: seconds of Python on one core,
holding the GIL. The native decomposition releases the GIL, so a second thread decomposes meanwhile.
What it starts on is a guess from names, dtypes and shapes alone (`guess_targets`); the plan decides.
A result is used only for a weight the plan targets with the same orientation (the transform's output
depends on nothing else: the weight, its orientation, the seed), and everything else is dropped.
Nothing is written before the plan is validated: early results wait in memory (at most max_bytes of
weights), and the pipeline writes them with the rest.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

from .. import pairing
from ..hf.checkpoint import Checkpoint
from ..hf.targets import Target
from ..io.safetensors import load_tensor
from ..options import PISSA_SAFETENSORS_CODES
from .transform import Factors

# transformers models whose linear layers are Conv1D (weight stored in x out)
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
# names all-linear leaves out or that are not Linear weights at all: not worth a guess
_NOT_LINEAR = re.compile(r"(^|\.)(lm_head|embed\w*|wte|wpe|word_embeddings|position_embeddings|"
                         r"token_type_embeddings|embeddings|shared|score|classifier|\w*norm\w*)$")


@dataclass
class Early:
    """One weight decomposed before the plan was ready."""
    guess: Target
    factors: Factors
    before: torch.Tensor  # pairing.sample_rows of the original weight
    nbytes: int


def guess_targets(ckpt: Checkpoint, spec, r: int, skip_shards=()) -> list:
    """Likely targets of `spec` from the checkpoint alone, in checkpoint order: 2-D float `.weight`
    tensors with r <= min(shape) whose names do not look like an embedding, an output head or a norm,
    filtered by the suffixes of a list spec (a regex or all-linear keeps them all)."""
    conv1d = ckpt.config.get("model_type") in CONV1D_MODEL_TYPES
    suffixes = tuple(spec) if isinstance(spec, (list, tuple)) else None
    out = []
    for shard in ckpt.shards:
        if shard in skip_shards:
            continue
        for info in ckpt.header(shard).tensors.values():
            if not info.name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in PISSA_SAFETENSORS_CODES \
                    or min(info.shape) < r:
                continue
            module = info.name[: -len(".weight")]
            if _NOT_LINEAR.search(module):
                continue
            if suffixes is not None and not any(module == s or module.endswith("." + s) for s in suffixes):
                continue
            out.append(Target(info.name, module, conv1d, info.shape, info.dtype))
    return out


class Speculator:
    """Runs the transform on guessed targets in a background thread until finish() is called or
    max_bytes of weights are held. Failures only end the speculation (the pipeline meets them again)."""

    def __init__(self, ckpt: Checkpoint, guesses: list, transform, max_bytes: int):
        self.ckpt, self.guesses, self.transform, self.max_bytes = ckpt, guesses, transform, max_bytes
        self.results: dict[str, Early] = {}
        self._threads = torch.get_num_threads()  # the same in this thread, so results are bit for bit the same
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pissa-fast-early", daemon=True)

    def start(self) -> "Speculator":
        if self.guesses:
            self._thread.start()
        return self

    def _run(self) -> None:
        from safetensors import safe_open

        held = 0
        try:
            torch.set_num_threads(self._threads)
            handles = {}
            for t in self.guesses:
                info = self.ckpt.info(t.key)
                if self._stop.is_set() or held + info.nbytes > self.max_bytes:
                    return
                shard = self.ckpt.location[t.key]
                if shard not in handles:
                    handles[shard] = safe_open(f"{self.ckpt.root}/{shard}", framework="pt")
                w = load_tensor(handles[shard], t.key)
                before = w[pairing.sample_rows(w.shape[0])].clone()
                factors = self.transform({t.key: w}, {t.key: t})[t.key]
                self.results[t.key] = Early(t, factors, before, info.nbytes)
                held += info.nbytes
        except Exception:  # noqa: BLE001 - a guess is never worth an error; the pipeline reports real ones
            return

    def finish(self) -> dict:
        """Stop (after the weight in progress) and return {key: Early}."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        results, self.results = self.results, {}  # the caller owns them now (and frees them as it goes)
        return results


def usable(early: dict, targets: list) -> dict:
    """The early results the plan can use: same tensor, same orientation."""
    by_key = {t.key: t for t in targets}
    return {k: e for k, e in early.items()
            if k in by_key and by_key[k].transposed == e.guess.transposed and by_key[k].shape == e.guess.shape}

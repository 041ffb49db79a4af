"""4-bit quantization with PiSSA: QPiSSA, and the QLoRA / LoftQ baselines it is compared with.

    out = pissa_fast.qpissa(weight, r=16, niter=4, iters=5)   # out.residual is NF4-exact, out.errors
    outs = pissa_fast.qpissa_many({"q": wq, ...}, r=16, iters=5, inplace=True)

Needs bitsandbytes (`pip install 'pissa_fast[quant]'`), imported only when a function runs.
"""
from .error import fro_norm, quant_error
from .loftq import loftq, loftq_reference, qlora
from .nf4 import QuantSpec
from .qpissa import QPiSSADecomposition, qpissa, qpissa_many
from .settings import bnb_config, read_settings

__all__ = ["QPiSSADecomposition", "QuantSpec", "bnb_config", "fro_norm", "loftq", "loftq_reference", "qlora",
           "qpissa", "qpissa_many", "quant_error", "read_settings"]

"""pissa_fast for peft: a backend for peft's own PiSSA init, and a drop-in get_peft_model.

    import pissa_fast.peft
    pissa_fast.peft.enable()          # every init_lora_weights="pissa..." peft runs now runs on pissa_fast
    with pissa_fast.peft.enabled():   # ... or only inside a block
        model = peft.get_peft_model(model, config)

    from pissa_fast.peft import get_peft_model   # drop-in: strict, seeded (dropin.py)

PISSA_FAST_PEFT=1 in the environment enables the backend in every Python process at startup
(_pissa_fast_peft_hook.py, through the pissa_fast_peft.pth file installed with the package).
"""
from ..options import progress_enabled
from .backend import disable, enable, enabled, is_enabled
from .dropin import add_adapter, get_peft_model, pissa_init_layers
from .niter import decompose_kwargs, pissa_niter
from .versions import PEFT_SPECIFIER

__all__ = [
    "PEFT_SPECIFIER", "add_adapter", "decompose_kwargs", "disable", "enable", "enabled", "get_peft_model",
    "is_enabled", "pissa_init_layers", "pissa_niter", "progress_enabled",
]

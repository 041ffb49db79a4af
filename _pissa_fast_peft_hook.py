"""Process-startup hook behind PISSA_FAST_PEFT=1: peft's PiSSA init runs on pissa_fast in every Python
process that has the variable (trainer CLIs, accelerate launch, torchrun workers), with no code change.

The pissa_fast_peft.pth file installed with the package runs, at every interpreter start,

    import os; 'PISSA_FAST_PEFT' in os.environ and __import__('_pissa_fast_peft_hook').install()

so a process without the variable pays one dict lookup. With it, install() imports nothing heavy: it
puts a finder on sys.meta_path that waits for the program's own `import peft` and calls
pissa_fast.peft.enable() right after peft has loaded (torch and pissa_fast load then, not before).
Values 0/false/no/off (or empty) leave the backend off.
"""
import importlib.abc
import os
import sys
import warnings

ENV = "PISSA_FAST_PEFT"
_OFF = ("", "0", "false", "no", "off")


def _enable() -> None:
    try:
        import pissa_fast.peft

        pissa_fast.peft.enable()
    except Exception as e:  # noqa: BLE001 - never break the user's `import peft`; peft's own init still runs
        warnings.warn(f"{ENV}=1: pissa_fast's PiSSA backend could not be enabled ({type(e).__name__}: {e}); "
                      f"peft's own PiSSA init runs instead", RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    """peft's own loader, then enable()."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.inner  # peft sees its own loader
        self.inner.exec_module(module)
        _enable()


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the top-level `peft` package, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Called from the .pth line when PISSA_FAST_PEFT is set."""
    if os.environ.get(ENV, "").strip().lower() in _OFF:
        return
    if "peft" in sys.modules:
        _enable()
    elif not any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())

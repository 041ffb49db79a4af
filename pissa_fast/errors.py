"""The package's error types, defined once. Pure Python: importable without the compiled library."""
from __future__ import annotations

BUILD_HINT = ("build it in the source tree with `pip install --no-build-isolation -e .` (or "
              "`python setup.py build_ext --inplace`); torch must be installed first")


class CheckpointError(Exception):
    """A problem with a checkpoint, an adapter or an output directory, said in one paragraph that names
    the file or argument, the value and what was expected. Raised before anything is written."""


class NativeLibraryMissing(ImportError):
    """pissa_fast's compiled library (pissa_fast._C) cannot be loaded. Only the native decomposition
    needs it: convert_to_lora, verify and the CLI's --help work without it."""

    def __init__(self, cause: BaseException | None = None, what: str = "pissa_fast's native ops"):
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(f"{what}: the compiled library pissa_fast._C could not be loaded{detail}; {BUILD_HINT}")
        self.cause = cause

    def module_getattr(self, module: str, names):
        """A module-level __getattr__ for a package that imported without the library: the native names
        raise this error (naming the attribute), any other name is a plain AttributeError."""
        names = frozenset(names)
        cause = self.cause

        def __getattr__(name):
            if name in names:
                raise NativeLibraryMissing(cause, f"{module}.{name}")
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return __getattr__


class Cancelled(Exception):
    """Work stopped early because another rank of the job failed (pissa_fast.distributed.team): the
    other rank's error is the one reported, not this."""

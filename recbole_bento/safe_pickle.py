"""Load RecBole checkpoints and dataset pickles without running code they might carry.

Both files are pickles: a plain ``pickle.load`` calls whatever callable the file names. This
unpickler resolves only an allowlist of names (RecBole's own classes, tensor/array/frame
rebuild functions, a few builtins), and only lets allowlisted *functions* be called (REDUCE):
RecBole classes are restored with ``__new__`` + state, never by calling their constructors
(``Config(...)`` would ``eval`` strings). Anything else is refused before it is imported.
"""

from __future__ import annotations

import enum
import io
import pickle
import types
from pathlib import Path
from typing import Any

import torch

# Functions and classes a legitimate RecBole checkpoint / dataset may *call* while unpickling.
_CALLABLE = {
    "builtins.slice",
    "builtins.set",
    "builtins.frozenset",
    "builtins.complex",
    "builtins.bytearray",
    "collections.OrderedDict",
    "collections.defaultdict",
    "collections.Counter",
    "_codecs.encode",
    "copyreg._reconstructor",
    "logging.getLogger",
    "torch.device",
    "torch.Size",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy.core.numeric._frombuffer",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.numeric._frombuffer",
    "pandas._libs.internals._unpickle_block",
    "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.internals.blocks.new_block",
    "pandas.core.indexes.range.RangeIndex",
    "pandas.core.indexes.base.Index",
    "pandas.core.frame.DataFrame",
    "pandas.core.series.Series",
    "pandas.core.internals.managers.BlockManager",
    "pandas.core.internals.managers.SingleBlockManager",
}
# Names that may be resolved but not called (restored via __new__ + __setstate__ only).
_REFERENCE_ONLY = {
    "yaml.loader.FullLoader",
    "yaml.loader.SafeLoader",
    "builtins.object",
}
# RecBole modules whose *classes* may appear (Config, Dataset, model classes, enums).
_RECBOLE_MODULE_PREFIXES = (
    "recbole.config.",
    "recbole.data.",
    "recbole.model.",
    "recbole.utils.enum_type",
)


def _torch_allowed() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


_TORCH_ALLOWED = _torch_allowed()


class UnsafePickleError(ValueError):
    """The file references a global that is not on the allowlist."""


def _is_recbole_class(qualified: str, obj: Any) -> bool:
    return qualified.startswith(_RECBOLE_MODULE_PREFIXES) and isinstance(obj, type)


class _RestrictedUnpickler(pickle._Unpickler):  # pure-Python unpickler: its REDUCE can be hooked
    what = "file"

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        allowed = (
            qualified in _CALLABLE
            or qualified in _REFERENCE_ONLY
            or qualified in _TORCH_ALLOWED
            or (qualified.startswith(_RECBOLE_MODULE_PREFIXES) and "." not in name)
        )
        if not allowed:
            raise UnsafePickleError(f"refused: the {self.what} references {qualified}, which is not allowed")
        obj = super().find_class(module, name)
        if qualified.startswith(_RECBOLE_MODULE_PREFIXES) and not isinstance(obj, type):
            raise UnsafePickleError(f"refused: the {self.what} references {qualified}, which is not allowed")
        return obj

    def _check_callable(self, func: Any) -> None:
        qualified = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
        if isinstance(func, type) and issubclass(func, enum.Enum):
            return  # Enum(value) is a lookup, never a side effect
        if isinstance(func, torch.storage._LegacyStorageMeta) or type(func).__name__ == "StorageType":
            return
        if qualified in _CALLABLE or qualified in _TORCH_ALLOWED:
            return
        names = {f"{m}.{n}" for m, n in _known_names(func)}
        if names & (_CALLABLE | _TORCH_ALLOWED):
            return
        raise UnsafePickleError(f"refused: the {self.what} calls {qualified}, which is not allowed")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_callable(func)
        self.stack[-1] = func(*args)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce


def _known_names(func: Any) -> list[tuple[str, str]]:
    """Names under which *func* may be listed (a C function's __module__ can differ from its path)."""
    out = []
    for qualified in _CALLABLE | _TORCH_ALLOWED:
        module, _, name = qualified.rpartition(".")
        mod = _import_if_loaded(module)
        if mod is not None and getattr(mod, name, None) is func:
            out.append((module, name))
    return out


def _import_if_loaded(module: str) -> types.ModuleType | None:
    import sys

    return sys.modules.get(module)


def _pickle_module(what: str) -> types.ModuleType:
    """A module object torch.load accepts as ``pickle_module``."""
    unpickler = type("RestrictedUnpickler", (_RestrictedUnpickler,), {"what": what})
    mod = types.ModuleType(f"recbole_bento_restricted_pickle_{what.replace(' ', '_')}")
    mod.Unpickler = unpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: unpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def load_checkpoint(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """Load a RecBole Trainer checkpoint onto the CPU."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    return torch.load(
        path, map_location="cpu", weights_only=False, pickle_module=_pickle_module("checkpoint")
    )


def load_dataset_pickle(path: Path, *, trust: bool = False) -> Any:
    """Load a pickled (or cloudpickled) RecBole Dataset."""
    data = Path(path).read_bytes()
    if trust:
        return pickle.loads(data)
    return _pickle_module("dataset pickle").Unpickler(io.BytesIO(data)).load()

"""Load RecBole checkpoints and dataset pickles without running code they might carry.

Both files are pickles: a plain ``pickle.load`` calls whatever callable the file names. This
unpickler resolves only an allowlist of names (RecBole's own classes, tensor/array/frame
rebuild functions, a few builtins), and only lets allowlisted *functions* be called (REDUCE):
RecBole classes are restored with ``__new__`` + state, never by calling their constructors
(``Config(...)`` would ``eval`` strings). Anything else is refused before it is imported.
"""

from __future__ import annotations

import _compat_pickle
import enum
import functools
import importlib
import inspect
import io
import logging
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
_TORCH_MODULE_PREFIX = "torch.nn.modules."


def _torch_allowed() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


_TORCH_ALLOWED = _torch_allowed()


class UnsafePickleError(ValueError):
    """The file references a global that is not on the allowlist."""


# Types a defaultdict factory or a copyreg._reconstructor base may be: data, never behaviour.
_DATA_TYPES = (object, dict, list, set, frozenset, tuple, int, float, complex, str, bytes, bytearray)
# Allowlisted torch functions that attach autograd hooks (callables run on backward): positional index.
_HOOKS_ARG = {
    "torch._utils._rebuild_tensor_v2": 5,
    "torch._utils._rebuild_tensor_v3": 5,
    "torch._utils._rebuild_parameter": 2,
    "torch._utils._rebuild_parameter_with_state": 2,
    "torch._utils._rebuild_qtensor": 6,
}


@functools.cache
def _allowed_callables() -> dict[int, str]:
    """id -> name of every allowlisted object that may be called. Identity, never ``__module__`` /
    ``__qualname__`` (an instance can carry those in its ``__dict__`` and pose as an allowed name)."""
    out = {}
    for qualified in sorted(_CALLABLE | _TORCH_ALLOWED):
        obj = _resolve(qualified)
        if obj is not None and callable(obj):
            out[id(obj)] = qualified
    return out


@functools.cache
def _reference_only() -> tuple[Any, ...]:
    return tuple(obj for obj in map(_resolve, sorted(_REFERENCE_ONLY)) if obj is not None)


def _resolve(qualified: str) -> Any:
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # e.g. numpy._core.* on numpy 1.x
        return None


def _describe(obj: Any) -> str:
    if isinstance(obj, type) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return f"an instance of {type(obj).__module__}.{type(obj).__qualname__}"


def _is_recbole_model_class(value: Any) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, torch.nn.Module)
        and value.__module__.startswith("recbole.model.")
    )


class _RestrictedUnpickler(pickle._Unpickler):  # pure-Python unpickler: its opcodes can be hooked
    what = "file"

    def _refuse(self, detail: str) -> UnsafePickleError:
        return UnsafePickleError(f"refused: the {self.what} {detail}, which is not allowed")

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # protocol 2 (torch.save) writes __builtin__.set
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        is_recbole = qualified.startswith(_RECBOLE_MODULE_PREFIXES)
        # torch.nn layer classes: feature models (SASRecF, FDSA, GRU4RecF) save a submodule in
        # other_parameter. Resolved to be restored with __new__ + checked state, never called.
        is_torch_module = qualified.startswith(_TORCH_MODULE_PREFIX)
        allowed = "." not in name and (  # protocol 4 resolves dotted names attribute by attribute
            qualified in _CALLABLE
            or qualified in _REFERENCE_ONLY
            or qualified in _TORCH_ALLOWED
            or is_recbole
            or is_torch_module
        )
        if not allowed:  # os.system pickles as posix.system (nt.system): name it as users write it
            shown = f"os.{name}" if module in ("posix", "nt") else qualified
            raise self._refuse(f"references {shown}")
        obj = super().find_class(module, name)
        # Only classes RecBole itself defines: its modules also import names (scipy, sklearn, Enum).
        if is_recbole and not (isinstance(obj, type) and obj.__module__.startswith("recbole.")):
            raise self._refuse(f"references {qualified}")
        if is_torch_module and not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
            raise self._refuse(f"references {qualified}")
        return obj

    # ------------------------------------------------------------ calls (REDUCE, OBJ, INST)

    def _check_call(self, func: Any, args: tuple) -> None:
        if isinstance(func, type) and issubclass(func, enum.Enum) and len(args) == 1:
            return  # Enum(value) is a lookup, never a side effect
        if isinstance(func, torch.storage._LegacyStorageMeta):
            return
        name = _allowed_callables().get(id(func))
        if name is None:
            raise self._refuse(f"calls {_describe(func)}")
        self._check_arguments(name, args)

    def _check_arguments(self, name: str, args: tuple) -> None:
        """Allowlisted functions that themselves call, or attach, an object taken from the file."""
        if name == "torch._tensor._rebuild_from_type_v2":  # (func, new_type, args, state): calls func
            if len(args) != 4:
                raise self._refuse(f"calls {name} with {len(args)} arguments")
            self._check_call(args[0], tuple(args[2]))
            if not (isinstance(args[1], type) and issubclass(args[1], torch.Tensor)):
                raise self._refuse(f"calls {name} to make {_describe(args[1])}")
            self._check_state(args[1], args[3])
        elif name == "torch._utils._rebuild_wrapper_subclass":
            if not (args and isinstance(args[0], type) and issubclass(args[0], torch.Tensor)):
                raise self._refuse(f"calls {name} to make {_describe(args[0] if args else None)}")
        elif name == "torch._utils._rebuild_parameter_with_state" and len(args) == 4:
            self._check_state(torch.nn.Parameter, args[3])
        elif name == "copyreg._reconstructor":  # (cls, base, state): calls base.__new__ and base.__init__
            cls, base = (args + (None, None))[:2]
            if not (isinstance(cls, type) and base in _DATA_TYPES and issubclass(cls, base)):
                raise self._refuse(f"calls copyreg._reconstructor with the base {_describe(base)}")
        elif name == "collections.defaultdict":  # the factory is called on every missing key
            if args and args[0] is not None and args[0] not in _DATA_TYPES:
                raise self._refuse(f"makes a defaultdict whose factory is {_describe(args[0])}")
        elif name == "pandas.core.indexes.base._new_Index":
            import pandas as pd

            if not (args and isinstance(args[0], type) and issubclass(args[0], pd.Index)):
                raise self._refuse(f"calls {name} to make {_describe(args[0] if args else None)}")
        if name in _HOOKS_ARG and len(args) > _HOOKS_ARG[name] and args[_HOOKS_ARG[name]]:
            raise self._refuse("attaches autograd hooks to a tensor")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_call(func, tuple(args))
        self.stack[-1] = func(*args)

    def _instantiate(self, klass: Any, args: Any) -> None:  # OBJ / INST: klass(*args) in pickle.py
        if args or not isinstance(klass, type) or hasattr(klass, "__getinitargs__"):
            self._check_call(klass, tuple(args))
        super()._instantiate(klass, args)

    # ------------------------------------------------------------ new objects and their state

    def _check_new(self, cls: Any) -> None:
        if not isinstance(cls, type):  # cls.__new__ of an instance would be an attribute it carries
            raise self._refuse(f"creates an object from {_describe(cls)}")

    def load_newobj(self) -> None:
        self._check_new(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_new(self.stack[-3])
        super().load_newobj_ex()

    def load_build(self) -> None:
        inst = self.stack[-2]
        shared = (type, types.ModuleType, enum.Enum, logging.Logger)
        if isinstance(inst, shared) or inspect.isroutine(inst):  # would alter process-wide objects
            raise self._refuse(
                f"sets attributes of {_describe(inst) if not isinstance(inst, enum.Enum) else inst}"
            )
        self._check_state(type(inst), self.stack[-1])
        super().load_build()

    def _check_state(self, owner: type, state: Any) -> None:
        """Instance state may hold data and RecBole's own model classes, never shadow a method, set a
        dunder, or plant a callable that later code would call as if it were a method."""
        if isinstance(state, dict):
            parts = [state]
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and all(p is None or isinstance(p, dict) for p in state)
        ):
            parts = [p for p in state if p]
        else:
            return  # opaque data for the class's own __setstate__ (arrays, dtypes, frames)
        for part in parts:
            for key, value in part.items():
                if issubclass(owner, torch.nn.Module) and "hook" in str(key) and value:
                    raise self._refuse(f"attaches {key} to a {owner.__qualname__}")  # run on forward/save
                if not isinstance(key, str) or (key.startswith("__") and key.endswith("__")):
                    raise self._refuse(f"sets the attribute {key!r} of {owner.__qualname__}")
                if inspect.isroutine(inspect.getattr_static(owner, key, None)):
                    raise self._refuse(f"replaces the method {owner.__qualname__}.{key}")
                if callable(value) and not (
                    _is_recbole_model_class(value) or any(value is ref for ref in _reference_only())
                ):
                    raise self._refuse(f"stores {_describe(value)} in {owner.__qualname__}.{key}")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


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

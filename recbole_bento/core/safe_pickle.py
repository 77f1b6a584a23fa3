"""Load RecBole checkpoints and dataset pickles without running code they might carry.

Both files are pickles: a plain ``pickle.load`` calls whatever callable the file names. This
unpickler resolves only an allowlist of names (RecBole's own classes, tensor/array/frame
rebuild functions, a few builtins), and only lets allowlisted *functions* be called (REDUCE):
RecBole classes are restored with ``__new__`` + state, never by calling their constructors
(``Config(...)`` would ``eval`` strings). Anything else is refused before it is imported.

State applied by BUILD is checked with pickle's own rules (what ``load_build`` would write, and
where) before anything is applied; numpy dtypes and arrays are restored only in the shapes numpy
itself pickles (no dtype flags or object arrays made from raw bytes, which would let a file choose
the pointers numpy dereferences).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
# A Dataset pickled after data_preparation holds torch tensors whose storages pickle as
# torch.storage._load_from_bytes(bytes), which runs torch.load(weights_only=False) on those bytes:
# this name resolves to _storage_from_bytes instead, which reads them with the weights-only loader.
_STORAGE_FROM_BYTES = "torch.storage._load_from_bytes"


def _torch_allowed() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


_TORCH_ALLOWED = _torch_allowed()


class UnsafePickleError(ValueError):
    """The file references a global that is not on the allowlist."""


def _storage_from_bytes(data: bytes) -> Any:
    """What ``torch.storage._load_from_bytes`` returns, read with torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"refused: a tensor storage given as {type(data).__name__}, not bytes")
    loaded = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(loaded, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"refused: tensor storage bytes that hold {type(loaded).__name__}")
    return loaded


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
    out[id(_storage_from_bytes)] = _STORAGE_FROM_BYTES
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
        if qualified == _STORAGE_FROM_BYTES:
            return _storage_from_bytes
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
            self._check_state(args[1], args[3], strict=True, via_setattr=True)  # torch's _set_obj_state
        elif name == "torch._utils._rebuild_wrapper_subclass":
            if not (args and isinstance(args[0], type) and issubclass(args[0], torch.Tensor)):
                raise self._refuse(f"calls {name} to make {_describe(args[0] if args else None)}")
        elif name == "torch._utils._rebuild_parameter_with_state" and len(args) == 4:
            self._check_state(torch.nn.Parameter, args[3], strict=True, via_setattr=True)
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
        elif name.endswith("numeric._frombuffer"):  # (buffer, dtype, shape, order): raw bytes
            self._check_raw_array(args[1] if len(args) > 1 else None)
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
        inst, state = self.stack[-2], self.stack[-1]
        shared = (type, types.ModuleType, enum.Enum, logging.Logger)
        if isinstance(inst, shared) or inspect.isroutine(inst):  # would alter process-wide objects
            raise self._refuse(
                f"sets attributes of {_describe(inst) if not isinstance(inst, enum.Enum) else inst}"
            )
        if isinstance(inst, np.dtype):
            self._check_dtype_state(inst, state)
        elif isinstance(inst, np.ndarray):
            self._check_array_state(state)
        elif getattr(inst, "__setstate__", None) is None:  # pickle applies the state itself
            self._check_state(type(inst), state, strict=True)
        else:  # the class's own __setstate__ reads it: dicts are checked, the rest is its data
            self._check_state(type(inst), state)
        super().load_build()

    def _check_dtype_state(self, dtype: np.dtype, state: Any) -> None:
        """``np.dtype(...)`` already made the dtype the file names; a genuine BUILD only restates
        it. Any other state (flags, item size, fields) would make numpy misread memory."""
        if not (isinstance(state, tuple) and state == dtype.__reduce__()[2]):
            raise self._refuse(f"rewrites the numpy dtype {dtype}")

    def _check_array_state(self, state: Any) -> None:
        """ndarray.__setstate__((version,) shape, dtype, is_fortran, data): raw bytes are copied as
        the array's memory, so they may never back an object array (they would be pointers)."""
        if isinstance(state, tuple) and len(state) in (4, 5):
            if isinstance(state[-1], (bytes, bytearray)):
                self._check_raw_array(state[-3])
            return
        raise self._refuse(f"restores a numpy array from {_describe(state)}")

    def _check_raw_array(self, dtype: Any) -> None:
        if not isinstance(dtype, np.dtype):
            raise self._refuse(f"makes a numpy array of {_describe(dtype)} from raw bytes")
        if dtype.hasobject:
            raise self._refuse(f"makes a numpy array of dtype {dtype} from raw bytes")

    def _check_state(
        self, owner: type, state: Any, *, strict: bool = False, via_setattr: bool = False
    ) -> None:
        """Instance state may hold data and RecBole's own model classes, never shadow a method, set a
        dunder, or plant a callable that later code would call as if it were a method.

        pickle's load_build, for a class without ``__setstate__``, writes ``state`` into the
        instance ``__dict__`` (anything with ``.items()``), or splits a 2-tuple into that and
        ``setattr`` calls: *strict* accepts only a dict or a 2-tuple of dicts (or None), so what
        is checked is exactly what gets applied. torch's ``_set_obj_state`` uses ``setattr`` for
        both parts (*via_setattr*); a setattr must not reach a property setter."""
        if isinstance(state, dict):
            parts = [state]
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and all(p is None or isinstance(p, dict) for p in state)
        ):
            parts = [p for p in state if p]
        elif strict:
            shape = (
                f"a tuple ({', '.join(type(p).__name__ for p in state)})"
                if isinstance(state, tuple)
                else _describe(state)
            )
            raise self._refuse(f"sets the state of {owner.__qualname__} from {shape}")
        else:
            return  # opaque data for the class's own __setstate__ (tensors, frames)
        if via_setattr:
            set_by_setattr = [key for part in parts for key in part]
        else:  # pickle: the dict part goes straight into __dict__, the slot part through setattr
            set_by_setattr = list(state[1] or {}) if isinstance(state, tuple) else []
        for key in set_by_setattr:  # a property setter would run on the file's data
            attr = inspect.getattr_static(owner, key, None) if isinstance(key, str) else None
            if hasattr(attr, "__set__") and not isinstance(attr, types.MemberDescriptorType):
                raise self._refuse(f"sets the property {owner.__qualname__}.{key}")
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


class _CountingReader(io.BufferedIOBase):
    """A file whose reads report how many bytes were read (the import's progress bar)."""

    def __init__(self, raw: io.BufferedIOBase, on_read: Callable[[int], None]) -> None:
        self._raw, self._on_read = raw, on_read

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(size)
        self._on_read(len(data))
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = self._raw.readline(size)
        self._on_read(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        done = self._raw.readinto(buffer)
        self._on_read(done)
        return done


def load_dataset_pickle(
    path: Path, *, trust: bool = False, on_read: Callable[[int], None] | None = None
) -> Any:
    """Load a pickled (or cloudpickled) RecBole Dataset; *on_read* is told the bytes read."""
    with open(path, "rb") as raw:
        file = _CountingReader(raw, on_read) if on_read is not None else raw
        if trust:
            return pickle.load(file)
        return _pickle_module("dataset pickle").Unpickler(file).load()

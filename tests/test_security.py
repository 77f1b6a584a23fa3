"""Issue 5: untrusted pickles are refused before any code they carry runs; an altered stored model
never serves."""

from __future__ import annotations

import collections
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import cloudpickle
import httpx
import pytest
import torch
from conftest import ROOT, free_port, run_import, serving

from recbole_bento.core import safe_pickle
from recbole_bento.core.artifact import ArtifactError, verify_digests
from recbole_bento.core.engine import pick_device
from recbole_bento.core.safe_pickle import UnsafePickleError, load_checkpoint, load_dataset_pickle


class RunsCommand:
    """Pickles as a call of os.system: unpickling it with plain pickle runs *command*."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def stored_tags() -> set[str]:
    return {str(m.tag) for m in bentoml.models.list()}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture(scope="module")
def evil_checkpoint(sasrec, tmp_path_factory) -> tuple[Path, Path]:
    """A real checkpoint (torch.save zip) with an os.system payload added; and its marker path."""
    folder = tmp_path_factory.mktemp("evil-ckpt")
    marker = folder / "ran"
    checkpoint = load_checkpoint(sasrec.checkpoint)
    checkpoint["other_parameter"] = {"note": RunsCommand(touch(marker))}
    path = folder / "SASRec.pth"
    torch.save(checkpoint, path)
    return path, marker


@pytest.fixture(scope="module")
def evil_dataset(sasrec, tmp_path_factory) -> tuple[Path, Path]:
    """The genuine Dataset pickle, re-pickled with an os.system payload in one attribute."""
    folder = tmp_path_factory.mktemp("evil-ds")
    marker = folder / "ran"
    dataset = load_dataset_pickle(sasrec.dataset_pickle)
    dataset.note = RunsCommand(touch(marker))
    path = folder / "dataset.pkl"
    path.write_bytes(cloudpickle.dumps(dataset))
    return path, marker


# ------------------------------------------------------------------ through the real CLI


def test_malicious_checkpoint_is_refused_and_never_runs(sasrec, evil_checkpoint):
    path, marker = evil_checkpoint
    before = stored_tags()
    result = run_import(path, "--dataset-pickle", sasrec.dataset_pickle, "--name", "evil")
    assert result.returncode == 1
    assert "refused: the checkpoint references os.system, which is not allowed" in result.stderr
    assert result.stdout == ""
    assert not marker.exists(), "the payload ran"
    assert stored_tags() == before


def test_malicious_dataset_pickle_is_refused_and_never_runs(sasrec, evil_dataset):
    path, marker = evil_dataset
    before = stored_tags()
    result = run_import(sasrec.checkpoint, "--dataset-pickle", path, "--name", "evil")
    assert result.returncode == 1
    assert "refused: the dataset pickle references os.system, which is not allowed" in result.stderr
    assert not marker.exists(), "the payload ran"
    assert stored_tags() == before


def test_the_payloads_are_real(evil_checkpoint, evil_dataset):
    """Control: with trust (plain pickle, what --trust-pickles does) the same files run the payload,
    so the refusals above are what kept it from running."""
    for (path, marker), load in ((evil_checkpoint, load_checkpoint), (evil_dataset, load_dataset_pickle)):
        assert not marker.exists()
        load(path, trust=True)
        assert marker.exists()
        marker.unlink()


def test_genuine_files_still_load(sasrec):
    checkpoint = load_checkpoint(sasrec.checkpoint)
    assert checkpoint["config"]["model"] == "SASRec"
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    dataset = load_dataset_pickle(sasrec.dataset_pickle)
    assert dataset.item_num == sasrec.dataset.item_num
    assert list(dataset.field2id_token[dataset.iid_field]) == list(
        sasrec.dataset.field2id_token[sasrec.dataset.iid_field]
    )


# ------------------------------------------------------------------ tricks through allowed names
#
# Hand-assembled pickles (protocol 2 opcodes) that reach a constructor or an attribute write through
# names the allowlist does let in. RecBole's Config(...) evals strings from its config_dict, so any
# way to call it is a way to run code.


def _value(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)[2:-1]  # the opcodes that push obj, without PROTO / STOP


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _short_unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


P2 = b"\x80\x02"
CONFIG = _global("recbole.config.configurator", "Config")
DATASET = _global("recbole.data.dataset.sequential_dataset", "SequentialDataset")


def _config_arg_values(marker: Path) -> tuple:
    """Config(model, dataset, config_file_list, config_dict): Config evals config_dict strings."""
    return ("SASRec", "ml-100k", None, {"note": f"__import__('os').system({touch(marker)!r})"})


def _config_args(marker: Path) -> bytes:  # the arguments as one tuple (REDUCE)
    return _value(_config_arg_values(marker))


def _config_arg_items(marker: Path) -> bytes:  # the arguments pushed one by one (OBJ, INST)
    return b"".join(_value(a) for a in _config_arg_values(marker))


def _new_dataset() -> bytes:  # SequentialDataset.__new__(SequentialDataset), as genuine pickles do
    return DATASET + b")\x81"


def _dtype(flags: int) -> bytes:
    """np.dtype('O') as numpy pickles it, its BUILD state carrying *flags* (63 is the genuine one)."""
    return (
        _global("numpy", "dtype")
        + _value(("O8", False, True))
        + b"R"
        + _value((3, "|", None, None, None, -1, -1, flags))
        + b"b"
    )


def _object_array_from_bytes(flags: int) -> bytes:
    """An ndarray of that dtype whose memory is 8 raw bytes from the file, i.e. a pointer 0x4141..."""
    reconstruct = _global("numpy.core.multiarray", "_reconstruct")
    new = reconstruct + b"(" + _global("numpy", "ndarray") + _value((0,)) + _value(b"b") + b"tR"
    return new + b"(" + _value(1) + _value((1,)) + _dtype(flags) + _value(False) + _value(b"A" * 8) + b"tb"


TRICKS = {
    # name: (pickle bytes given the marker path, expected refusal, does plain pickle run the payload?)
    "REDUCE os.system": (
        lambda m: P2 + _global("os", "system") + _value((touch(m),)) + b"R.",
        "references os.system",
        True,
    ),
    "REDUCE builtins.eval": (
        lambda m: (
            P2 + _global("builtins", "eval") + _value((f"__import__('os').system({touch(m)!r})",)) + b"R."
        ),
        "references builtins.eval",
        True,
    ),
    "getattr chain": (
        lambda m: (
            P2
            + _global("builtins", "getattr")
            + b"("
            + _global("builtins", "object")
            + _value("__subclasses__")
            + b"tR."
        ),
        "references builtins.getattr",
        False,
    ),
    "REDUCE on a RecBole class": (
        lambda m: P2 + CONFIG + _config_args(m) + b"R.",
        "calls recbole.config.configurator.Config",
        True,
    ),
    "OBJ opcode on a RecBole class": (
        lambda m: P2 + b"(" + CONFIG + _config_arg_items(m) + b"o.",
        "calls recbole.config.configurator.Config",
        True,
    ),
    "INST opcode on a RecBole class": (
        lambda m: P2 + b"(" + _config_arg_items(m) + b"irecbole.config.configurator\nConfig\n.",
        "calls recbole.config.configurator.Config",
        True,
    ),
    "torch _rebuild_from_type_v2 calling a RecBole class": (
        lambda m: (
            P2
            + _global("torch._tensor", "_rebuild_from_type_v2")
            + b"("
            + CONFIG
            + _global("torch", "Tensor")
            + _config_args(m)
            + b"}tR."
        ),
        "calls recbole.config.configurator.Config",
        True,
    ),
    "copyreg._reconstructor with a RecBole base": (
        lambda m: (
            P2 + _global("copyreg", "_reconstructor") + b"(" + CONFIG + CONFIG + _value("SASRec") + b"tR."
        ),
        "calls copyreg._reconstructor with the base recbole.config.configurator.Config",
        False,
    ),
    "defaultdict with a RecBole factory": (
        lambda m: P2 + _global("collections", "defaultdict") + b"(" + CONFIG + b"tR.",
        "makes a defaultdict whose factory is recbole.config.configurator.Config",
        False,
    ),
    "dotted name (protocol 4)": (
        lambda m: (
            b"\x80\x04" + _short_unicode("recbole") + _short_unicode("config.configurator.Config") + b"\x93."
        ),
        "references recbole.config.configurator.Config",
        False,
    ),
    "non-RecBole class re-exported by a RecBole module": (
        lambda m: P2 + _global("recbole.data.dataset.dataset", "coo_matrix") + b".",
        "references recbole.data.dataset.dataset.coo_matrix",
        False,
    ),
    "enum.Enum re-exported by a RecBole module": (
        lambda m: P2 + _global("recbole.config.configurator", "Enum") + b".",
        "references recbole.config.configurator.Enum",
        False,
    ),
    "BUILD on a class (rewrites it for the whole process)": (
        lambda m: P2 + DATASET + b"N}" + _value("build") + CONFIG + b"s\x86b.",
        "sets attributes of recbole.data.dataset.sequential_dataset.SequentialDataset",
        False,
    ),
    "BUILD on a shared logger": (
        lambda m: (
            P2
            + _global("logging", "getLogger")
            + _value(("recbole",))
            + b"R"
            + b"}"
            + _value("disabled")
            + _value(True)
            + b"sb."
        ),
        "sets attributes of an instance of logging.Logger",
        False,
    ),
    "instance attribute shadowing a method": (
        lambda m: P2 + _new_dataset() + b"}" + _value("build") + _value(1) + b"sb.",
        "replaces the method SequentialDataset.build",
        False,
    ),
    "instance attribute holding a RecBole class": (
        lambda m: P2 + _new_dataset() + b"}" + _value("loader") + CONFIG + b"sb.",
        "stores recbole.config.configurator.Config in SequentialDataset.loader",
        False,
    ),
    "dunder attribute": (
        lambda m: P2 + _new_dataset() + b"}" + _value("__class__") + CONFIG + b"sb.",
        "sets the attribute '__class__' of SequentialDataset",
        False,
    ),
    "calling an object that is not a function": (
        lambda m: P2 + _new_dataset() + _value(("x",)) + b"R.",
        "calls an instance of recbole.data.dataset.sequential_dataset.SequentialDataset",
        False,
    ),
    # issue 12: pickle's load_build applies state[0] of ANY 2-tuple, so a (dict, 0) state must not
    # skip the checks a (dict, None) state gets
    "BUILD state (dict, 0) on a Dataset": (
        lambda m: P2 + _new_dataset() + b"}" + _value("build") + _value(1) + b"s" + _value(0) + b"\x86b.",
        "sets the state of SequentialDataset from a tuple (dict, int)",
        False,
    ),
    "BUILD state (dict, 0) overriding OrderedDict.keys": (
        lambda m: (
            P2
            + _global("collections", "OrderedDict")
            + b")R}"
            + _value("keys")
            + _value(1)
            + b"s"
            + _value(0)
            + b"\x86b."
        ),
        "sets the state of OrderedDict from a tuple (dict, int)",
        False,
    ),
    "BUILD on a numpy dtype clearing its flags": (
        lambda m: P2 + _dtype(0) + b".",
        "rewrites the numpy dtype object",
        False,
    ),
    "object array from raw bytes (genuine dtype)": (
        lambda m: P2 + _object_array_from_bytes(63) + b".",
        "makes a numpy array of dtype object from raw bytes",
        False,
    ),
    "numpy _frombuffer making an object array": (
        lambda m: (
            P2
            + _global("numpy.core.numeric", "_frombuffer")
            + b"("
            + _value(b"A" * 8)
            + _dtype(63)
            + _value((1,))
            + _value("C")
            + b"tR."
        ),
        "makes a numpy array of dtype object from raw bytes",
        False,
    ),
    "NEWOBJ on an object that is not a class": (
        lambda m: P2 + _new_dataset() + b")\x81.",
        "creates an object from an instance of recbole.data.dataset.sequential_dataset.SequentialDataset",
        False,
    ),
}


@pytest.mark.parametrize("name", list(TRICKS))
def test_restricted_unpickler_refuses(name, marker, tmp_path):
    from recbole.data.dataset.sequential_dataset import SequentialDataset

    build, expected, _ = TRICKS[name]
    path = tmp_path / "file.pkl"
    path.write_bytes(build(marker))
    original_build = SequentialDataset.build
    with pytest.raises(UnsafePickleError, match="refused: the dataset pickle ") as refused:
        load_dataset_pickle(path)
    assert expected in str(refused.value)
    assert str(refused.value).endswith("which is not allowed")
    assert not marker.exists(), "the payload ran"
    assert SequentialDataset.build is original_build


def test_the_crafted_files_do_run_code_under_plain_pickle(tmp_path):
    """Control for the tricks marked as running code: plain pickle (in a separate process) runs their
    payload, so each refusal above is what kept it from running."""
    cases = {name: tmp_path / f"marker-{i}" for i, name in enumerate(TRICKS) if TRICKS[name][2]}
    files = []
    for name, marker in cases.items():
        path = marker.with_suffix(".pkl")
        path.write_bytes(TRICKS[name][0](marker))
        files.append(str(path))
    script = (
        "import contextlib, pickle, sys\n"
        "for f in sys.argv[1:]:\n"
        "    with contextlib.suppress(Exception):\n"
        "        pickle.loads(open(f, 'rb').read())\n"
    )
    subprocess.run([sys.executable, "-c", script, *files], cwd=ROOT, capture_output=True, timeout=300)
    assert [name for name, marker in cases.items() if not marker.exists()] == []


def test_autograd_hooks_in_a_checkpoint_are_refused(tmp_path):
    """Tensors restored with backward hooks would call them on backward: refused."""

    class HookedParameter:
        def __reduce__(self):
            hooks = collections.OrderedDict(hook=collections.Counter)
            return (torch._utils._rebuild_parameter, (torch.zeros(2), True, hooks))

    path = tmp_path / "hooked.pth"
    torch.save({"state_dict": {"w": HookedParameter()}}, path)
    with pytest.raises(UnsafePickleError, match="refused: the checkpoint attaches autograd hooks"):
        load_checkpoint(path)


def test_allowed_callables_are_matched_by_identity():
    """An allowed name is trusted only for the very object it names (never an object claiming that
    name through __module__ / __qualname__)."""
    allowed = safe_pickle._allowed_callables()
    assert allowed[id(collections.OrderedDict)] == "collections.OrderedDict"
    assert id(os.system) not in allowed and id(eval) not in allowed


# ------------------------------------------------------------------ integrity of the stored model


def test_verify_digests_names_missing_and_altered_files(sasrec_tag, tmp_path):
    model = bentoml.models.get(sasrec_tag)
    copy_dir = tmp_path / "copy"
    shutil.copytree(model.path, copy_dir)
    digests = model.info.metadata["files"]
    verify_digests(copy_dir, digests)
    (copy_dir / "item_popularity.npy").unlink()
    with pytest.raises(ArtifactError, match="stored file item_popularity.npy is missing"):
        verify_digests(copy_dir, digests)


@pytest.mark.server
def test_altered_stored_file_stops_the_server(sasrec_tag, tmp_path):
    """One flipped byte in the stored weights: `bentoml serve` exits with an error naming the file,
    and /readyz never answers 200."""
    model = bentoml.models.get(sasrec_tag)
    home = tmp_path / "bentoml-home"
    target = home / "models" / model.tag.name / model.tag.version
    shutil.copytree(model.path, target)
    (home / "models" / model.tag.name / "latest").write_text(model.tag.version)
    weights = target / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "BENTOML_HOME": str(home), "RECBOLE_BENTO_MODEL": sasrec_tag},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
                except httpx.HTTPError:
                    ready = None
                assert ready != 200, "an altered model became ready"
                time.sleep(0.3)
            assert proc.poll() is not None, "bentoml serve neither became ready nor exited"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log.read_text()
    assert proc.returncode != 0
    assert (
        "integrity check failed: stored file weights.pt does not match the sha256 recorded at import" in text
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cudaa", "RECBOLE_BENTO_DEVICE='cudaa' is not a device: use cpu, cuda or cuda:<index>"),
        ("meta", "RECBOLE_BENTO_DEVICE='meta' is not a device: use cpu, cuda or cuda:<index>"),
        ("cuda:99", "RECBOLE_BENTO_DEVICE='cuda:99': this machine has"),
    ],
)
def test_unusable_device_is_refused_naming_the_setting(value, message):
    """What the service checks RECBOLE_BENTO_DEVICE with at start (the server test below shows one
    such refusal stopping `bentoml serve`)."""
    with pytest.raises(ValueError) as refused:
        pick_device(value)
    assert message in str(refused.value)


@pytest.mark.server
@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("DEVICE", "cudaa", "RECBOLE_BENTO_DEVICE='cudaa' is not a device: use cpu, cuda or cuda:<index>"),
        ("MAX_TOPK", "ten", "RECBOLE_BENTO_MAX_TOPK='ten' is not an integer"),
    ],
)
def test_unusable_setting_stops_the_server(sasrec_tag, setting, value, message):
    """A setting the service cannot run with stops `bentoml serve` at start with the reason, instead
    of BentoML restarting a failing worker forever (docs/errors.md): one setting read when the
    settings load, one when the service picks its device."""
    env = {f"RECBOLE_BENTO_{setting}": value}
    with pytest.raises(RuntimeError, match="bentoml serve exited") as failed, serving(sasrec_tag, **env):
        pass
    assert message in str(failed.value)

"""Reading checkpoint files: archives without TorchScript, plain and wrapped state dicts, and every bad input."""
import fractions
import os
import pickle
import zipfile

import pytest
import torch

import clip
from clip._checkpoint import CheckpointError, _refused_global
from clip._layouts import read_state_dict
from clip.model import ARCHIVE_SCALAR_KEYS
from checkpoints import TINY_RN, TINY_VIT, random_state_dict, save_archive, save_state_dict



def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dims", [TINY_VIT, TINY_RN], ids=["vit", "rn"])
def test_archive_reads_as_the_state_dict_with_its_scalars(tmp_path, dims):
    state_dict = random_state_dict(dims)
    path = save_archive(tmp_path / "model.pt", state_dict)
    assert_same_tensors(read_state_dict(path), state_dict)


def test_archive_path_never_runs_torchscript(tmp_path, monkeypatch):
    path = save_archive(tmp_path / "model.pt", random_state_dict(TINY_VIT))

    def refuse(*args, **kwargs):
        raise AssertionError("TorchScript was used on the non-JIT path")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _ = clip.load(path, device="cpu")
    assert model.dtype == torch.float32


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", "module."), ("model", ""), (None, "module."),
                                         ("model", "module._orig_mod.")])
def test_plain_and_wrapped_state_dicts(tmp_path, wrap, prefix):
    state_dict = random_state_dict(TINY_VIT)
    path = save_state_dict(tmp_path / "weights.pth", state_dict, wrap=wrap, prefix=prefix)
    want = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALAR_KEYS}
    assert_same_tensors(read_state_dict(path), want)


def test_plain_state_dicts_are_mapped_without_torch_load(tmp_path, monkeypatch):
    state_dict = random_state_dict(TINY_VIT)
    path = save_state_dict(tmp_path / "weights.pth", state_dict, wrap="state_dict")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load should not be needed"))
    want = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALAR_KEYS}
    assert_same_tensors(read_state_dict(path), want)


def test_objects_beyond_tensors_go_to_torch_load_weights_only(tmp_path):
    """A checkpoint with an object our unpickler does not rebuild (a torch.Size) loads through weights_only."""
    state_dict = {k: v for k, v in random_state_dict(TINY_VIT).items() if k not in ARCHIVE_SCALAR_KEYS}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state_dict, "epoch": 7, "input_shape": torch.Size([3, 32, 32])}, path)
    assert_same_tensors(read_state_dict(str(path)), state_dict)


def test_compressed_entries_are_read_too(tmp_path):
    """A zip rewritten by a generic tool (deflated entries, no alignment) still reads, just not memory-mapped."""
    state_dict = random_state_dict(TINY_VIT)
    source = save_archive(tmp_path / "model.pt", state_dict)
    path = tmp_path / "recompressed.pt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in original.infolist():
            copy.writestr(info.filename, original.read(info))
    assert_same_tensors(read_state_dict(str(path)), state_dict)


def test_legacy_non_zip_torch_save(tmp_path):
    state_dict = {k: v for k, v in random_state_dict(TINY_VIT).items() if k not in ARCHIVE_SCALAR_KEYS}
    path = tmp_path / "legacy.pt"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    assert_same_tensors(read_state_dict(str(path)), state_dict)


def test_missing_path(tmp_path):
    """The original's RuntimeError, and a FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere.pt"):
        read_state_dict(str(tmp_path / "nowhere.pt"))
    with pytest.raises(RuntimeError, match="nowhere.pt") as info:
        clip.load(str(tmp_path / "nowhere.pt"), device="cpu")
    assert isinstance(info.value, FileNotFoundError)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        read_state_dict(str(tmp_path))
    with pytest.raises(RuntimeError, match=str(tmp_path)):  # the original's error for a folder
        clip.load(str(tmp_path), device="cpu")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        read_state_dict(str(path))


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_archive(tmp_path, keep):
    full = save_archive(tmp_path / "full.pt", random_state_dict(TINY_VIT))
    data = open(full, "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated.pt .*(truncated|not a readable CLIP checkpoint)"):
        read_state_dict(str(path))


def test_truncated_state_dict(tmp_path):
    full = save_state_dict(tmp_path / "full.pt", random_state_dict(TINY_VIT))
    data = open(full, "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt .*not a readable CLIP checkpoint"):
        read_state_dict(str(path))


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"noise.bin \(4,096 bytes\) is not a readable CLIP checkpoint"):
        read_state_dict(str(path))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_wants_to_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": RunsCode()}, path)
    refused = r"evil.pt holds pickled objects other than tensors \((posix|os|nt).system\)"
    with pytest.raises(CheckpointError, match=refused):
        read_state_dict(str(path))


class Evaluates:
    def __reduce__(self):
        return (eval, ("0",))


@pytest.mark.parametrize("payload, name", [(fractions.Fraction(1, 3), r"fractions\.Fraction"),
                                           (Evaluates(), r"(builtins\.)?eval")], ids=["class", "builtin"])
def test_any_refused_global_is_named(tmp_path, payload, name):
    """Not only the modules torch always refuses (os, posix, sys): any global outside its allowed list."""
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(1), "payload": payload}, path)
    with pytest.raises(CheckpointError, match=rf"other.pt holds pickled objects other than tensors \({name}\)"):
        read_state_dict(str(path))


# torch.load(weights_only=True)'s refusals, as torch words them (its "Weights only load failed ..." preamble cut).
REFUSALS = {
    "2.4.1": ("WeightsUnpickler error: Unsupported global: GLOBAL posix.system was not an allowed global by default. "
              "Please use `torch.serialization.add_safe_globals([system])` to allowlist this global if you trust "
              "this class/function.", "posix.system"),
    "2.14.1 and 2.15.0, blocked": ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
                       "posix.system"),
    "2.14.1 and 2.15.0, builtin": ("WeightsUnpickler error: Unsupported global: GLOBAL eval was not an allowed global by default. "
                       "Please use `torch.serialization.add_safe_globals([eval])` or the "
                       "`torch.serialization.safe_globals([eval])` context manager to allowlist this global if you "
                       "trust this class/function.", "eval"),
    "2.14.1 protocol 4": ("WeightsUnpickler error: \n\nUnsupported operand 149", None),
}


@pytest.mark.parametrize("message, name", list(REFUSALS.values()), ids=list(REFUSALS))
def test_the_refused_global_is_read_from_every_wording(message, name):
    assert _refused_global(message) == name


def test_an_archive_whose_data_pkl_wants_to_run_code_is_refused(tmp_path):
    """A TorchScript-shaped zip whose data.pkl names os.system: the restricted unpickler refuses it."""
    path = tmp_path / "evil-archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(RunsCode(), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match=r"refusing to load (posix|os|nt)\.system"):
        read_state_dict(str(path))


def test_a_dict_of_the_wrong_model(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError) as info:
        clip.load(str(path), device="cpu")
    message = str(info.value)
    assert "resnet.pth is not a CLIP checkpoint" in message
    assert "unexpected keys (2): conv1.weight, fc.weight" in message
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, KeyError)  # the original's load raised KeyError from build_model here
    assert not message.startswith("'")  # not quoted as KeyError's own __str__ would


def test_a_loop_of_links_is_named_by_load(tmp_path):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="loop.pt.*loop of symbolic links"):
        clip.load(str(loop), device="cpu")


def test_a_dict_without_tensors(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="config.pt holds a dict without tensors"):
        read_state_dict(str(path))


def test_build_model_errors_are_caught_as_the_originals_were():
    """The original raised KeyError for a dict without the keys it reads, RuntimeError from load_state_dict for
    keys or shapes that do not fit; code that catches those catches ours, whose message is not quoted."""
    from clip.model import StateDictError, build_model

    foreign = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    with pytest.raises(KeyError) as info:
        build_model(foreign)
    assert isinstance(info.value, StateDictError) and str(info.value).startswith("not a CLIP state dict")
    extra = dict(random_state_dict(TINY_VIT), **{"visual.extra.weight": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"unexpected keys \(1\): visual.extra.weight"):
        build_model(extra)
    wrong = dict(random_state_dict(TINY_VIT), **{"visual.ln_pre.weight": torch.zeros(63)})
    with pytest.raises(RuntimeError, match=r"shape of visual.ln_pre.weight"):
        build_model(wrong)
    with pytest.raises(TypeError, match="not a list"):  # the original's error for a list
        build_model([])


def test_a_bug_of_ours_while_unpickling_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """Errors that our own rebuild functions raise surface as they are; only the file's faults are CheckpointErrors."""
    from clip import _checkpoint

    path = save_archive(tmp_path / "model.pt", random_state_dict(TINY_VIT))

    def broken(*args):
        raise TypeError("a bug in the rebuild function")

    monkeypatch.setattr(_checkpoint, "_rebuild_tensor", broken)
    with pytest.raises(TypeError, match="a bug in the rebuild function"):
        read_state_dict(path)


def test_the_exceptions_live_in_one_module_and_keep_their_documented_paths():
    import clip._cache
    import clip._checkpoint
    import clip._errors
    import clip.model

    assert clip._checkpoint.CheckpointError is clip._errors.CheckpointError
    assert clip._checkpoint.CheckpointNotFoundError is clip._errors.CheckpointNotFoundError
    assert clip.model.StateDictError is clip._errors.StateDictError
    assert clip._cache.DownloadError is clip._errors.DownloadError
    assert clip._cache.CacheFolderError is clip._errors.CacheFolderError
    assert issubclass(clip._errors.StateDictError, (KeyError, RuntimeError))

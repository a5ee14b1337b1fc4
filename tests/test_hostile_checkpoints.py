"""Hostile and broken checkpoints: each family ends in a CheckpointError that names the file, in bounded time and
memory.

Every load runs in a child process under an address-space limit (2 GiB above what the imports take) and a time
limit, so a regression shows as a failure here, not as a stalled or swapping test run. The files are tiny and made
here: hand-written pickles for what ``torch.save`` would never write.
"""
import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from checkpoints import TINY_VIT, random_state_dict, save_state_dict

CHECKPOINT_ERROR = "clip._errors.CheckpointError"  # what clip._checkpoint.CheckpointError names
# A bounded parse of a file of a few kilobytes takes milliseconds; the unbounded ones took minutes or ran out of
# memory. Generous for a loaded 2-core machine.
SECONDS_PER_LOAD = 5
# The address space a load may add to what the imports reserve: the files here need kilobytes, the failures
# this guards against asked for 4 to 256 GB.
EXTRA_ADDRESS_SPACE = 2 << 30

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import clip, clip.clip
    from clip._layouts import read_state_dict

    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = size + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = []
    for how, path in json.loads(sys.argv[2]):
        start = time.perf_counter()
        try:
            clip.load(path, device="cpu") if how == "load" else read_state_dict(path)
            outcome = {"error": None}
        except BaseException as e:
            # The error's class and its bases: a CheckpointError may be a subclass (clip.load's wrong-model error).
            outcome = {"error": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__], "message": str(e)[:2000]}
        outcome["seconds"] = time.perf_counter() - start
        results.append(outcome)
    print(json.dumps(results))
""")


class Case:
    """One load: ``how`` is "read" (``read_state_dict``) or "load" (``clip.load``); ``message`` must be in its
    error, ``unsaid`` must not be."""

    def __init__(self, path, how="read", message=None, unsaid=None):
        self.path, self.how, self.message, self.unsaid = str(path), how, message, unsaid


FAMILIES = {}


def family(builder):
    """Register a builder of the cases of one family: ``builder(folder) -> [Case]``."""
    FAMILIES[builder.__name__] = builder
    return builder


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every family's cases, loaded in one child process (the imports cost seconds; the loads milliseconds)."""
    cases = {name: builder(tmp_path_factory.mktemp(name)) for name, builder in FAMILIES.items()}
    flat = [case for family_cases in cases.values() for case in family_cases]
    # The imports take seconds on a busy machine; each load then has SECONDS_PER_LOAD.
    timeout = 120 + SECONDS_PER_LOAD * len(flat)
    done = subprocess.run([sys.executable, "-c", CHILD, str(EXTRA_ADDRESS_SPACE),
                           json.dumps([(c.how, c.path) for c in flat])],
                          capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-3000:]
    results = iter(json.loads(done.stdout.strip().splitlines()[-1]))
    return {name: [(case, next(results)) for case in family_cases] for name, family_cases in cases.items()}


def assert_refused(outcomes, name):
    """Each case of the family: a CheckpointError naming the file (and the expected cause), in bounded time."""
    assert outcomes[name], name
    for case, outcome in outcomes[name]:
        label = os.path.basename(case.path)
        assert outcome["error"] and CHECKPOINT_ERROR in outcome["error"], (label, outcome)
        assert case.path in outcome["message"], (label, outcome["message"])
        assert outcome["seconds"] < SECONDS_PER_LOAD, (label, outcome["seconds"])
        if case.message is not None:
            assert case.message in outcome["message"], (label, outcome["message"])
        if case.unsaid is not None:
            assert case.unsaid not in outcome["message"], (label, outcome["message"])


# --------------------------------------------------------------------------------------------------------------
# hand-made zip checkpoints


class Storage:
    """A storage of a hand-made checkpoint: ``data`` is the entry's bytes, ``numel`` what data.pkl claims."""

    def __init__(self, key, data: bytes, numel=None, cls=torch.FloatStorage):
        self.key, self.data, self.cls = key, data, cls
        self.numel = len(data) // 4 if numel is None else numel


class Tensor:
    """A tensor description as torch.save writes it, with whatever offset, size and stride a test wants."""

    def __init__(self, storage, offset, size, stride, build=None):
        self.storage, self.offset, self.size, self.stride, self.build = storage, offset, size, stride, build

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        if self.build is not None:
            return torch._utils._rebuild_tensor_v2, args, self.build  # a BUILD opcode on the tensor
        return torch._utils._rebuild_tensor_v2, args


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def dumps(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def storages_of(obj):
    if isinstance(obj, Tensor):
        return [obj.storage]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in storages_of(v)]
    return []


def write_zip(path, data_pkl: bytes, storages=(), *, scripted=False, compression=zipfile.ZIP_STORED) -> str:
    """A zip checkpoint laid out as torch.save (or, ``scripted``, as torch.jit.save) writes one."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("m/data.pkl", data_pkl)
        archive.writestr("m/byteorder", "little")
        if scripted:
            archive.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
            archive.writestr("m/code/__torch__.py", "")
        for storage in {s.key: s for s in storages}.values():
            archive.writestr(f"m/data/{storage.key}", storage.data)
    return str(path)


def saved(path, obj) -> str:
    return write_zip(path, dumps(obj), storages_of(obj))


def weights(n=4):
    return Storage("0", torch.arange(n, dtype=torch.float32).numpy().tobytes())


def test_the_hand_made_files_are_read_when_well_formed(tmp_path):
    """The generator writes what the reader accepts, so each refusal below is for the one thing changed."""
    from clip._checkpoint import read_file

    storage = weights()
    path = saved(tmp_path / "good.pt", {"w": Tensor(storage, 1, (3,), (1,)), "m": Tensor(storage, 0, (2, 2), (2, 1))})
    tensors = read_file(path)
    assert tensors["w"].tolist() == [1, 2, 3] and tensors["m"].tolist() == [[0, 1], [2, 3]]


# --------------------------------------------------------------------------------------------------------------
# (a) object graphs: diamonds, cycles, depth

# Opcodes of pickle protocol 2, for graphs that pickle.dumps cannot write (it recurses) or would write as trees.
PROTO, GLOBAL_M, NEW_OBJECT = b"\x80\x02", b"c__torch__\nM\nq\x000", b"h\x00)\x81"
STOP, POP, SETITEM, BUILD, EMPTY_DICT = b".", b"0", b"s", b"b", b"}"


def _name(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def diamond_pickle(levels: int) -> bytes:
    """Module stand-ins where each level holds the next one twice: 2 ** levels paths to the bottom."""
    body = NEW_OBJECT + EMPTY_DICT + BUILD + _put(1) + POP
    for level in range(2, levels + 2):
        body += (NEW_OBJECT + EMPTY_DICT + _name("a") + _get(level - 1) + SETITEM + _name("b") + _get(level - 1)
                 + SETITEM + BUILD + _put(level) + POP)
    return PROTO + GLOBAL_M + body + _get(levels + 1) + STOP


def cycle_pickle() -> bytes:
    """A module stand-in that holds itself."""
    return PROTO + GLOBAL_M + NEW_OBJECT + _put(1) + EMPTY_DICT + _name("self") + _get(1) + SETITEM + BUILD + STOP


def deep_pickle(depth: int) -> bytes:
    """A chain of ``depth`` nested module stand-ins."""
    return (PROTO + GLOBAL_M + (NEW_OBJECT + EMPTY_DICT + _name("a")) * depth + NEW_OBJECT + EMPTY_DICT + BUILD
            + (SETITEM + BUILD) * depth + STOP)


@family
def graphs(tmp):
    return [Case(write_zip(tmp / "diamond.pt", diamond_pickle(60), scripted=True), message="reached twice"),
            Case(write_zip(tmp / "cycle.pt", cycle_pickle(), scripted=True), message="reached twice"),
            Case(write_zip(tmp / "deep.pt", deep_pickle(100_000), scripted=True), message="levels deep"),
            # Deep plain containers: nothing walks them, and freeing them must not recurse either.
            Case(write_zip(tmp / "deep-dict.pt", PROTO + b"".join([b"}", _name("a")] * 100_000) + b"}"
                           + SETITEM * 100_000 + STOP), message="without tensors"),
            Case(write_zip(tmp / "deep-list.pt", PROTO + b"]" * 100_000 + b"a" * 99_999 + STOP),
                 message="holds a list")]


def test_object_graphs_are_walked_once_and_not_too_deep(outcomes):
    assert_refused(outcomes, "graphs")


# --------------------------------------------------------------------------------------------------------------
# (b) entries that claim more bytes than they hold


def claim_size(path, entry: str, size: int) -> str:
    """Rewrite the uncompressed size that the zip's central directory and local header give for ``entry``."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(entry)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size at 22
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        name_length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + name_length] == entry.encode():
            struct.pack_into("<I", data, central + 24, size)  # central header: uncompressed size at 24
        central = data.find(b"PK\x01\x02", central + 4)
    open(path, "wb").write(bytes(data))
    return str(path)


@family
def claims(tmp):
    claimed = 3 << 30  # 3 GiB, beyond the child's limit
    storage = Storage("0", b"\0" * 1024, numel=claimed // 4)
    obj = {"w": Tensor(storage, 0, (claimed // 4,), (1,))}
    deflated = write_zip(tmp / "bomb.pt", dumps(obj), [storage], compression=zipfile.ZIP_DEFLATED)
    pickle_bomb = write_zip(tmp / "pickle-bomb.pt", dumps({"w": Tensor(weights(), 0, (4,), (1,))}), [weights()],
                            compression=zipfile.ZIP_DEFLATED)
    stored = write_zip(tmp / "stored.pt", dumps(obj), [storage])
    scripted = write_zip(tmp / "scripted-bomb.pt", dumps(obj), [storage], scripted=True,
                         compression=zipfile.ZIP_DEFLATED)
    return [Case(claim_size(deflated, "m/data/0", claimed), message="more than deflate can produce"),
            Case(claim_size(pickle_bomb, "m/data.pkl", claimed), message="more than deflate can produce"),
            Case(claim_size(stored, "m/data/0", claimed), message="is stored, yet claims"),
            Case(claim_size(scripted, "m/data/0", claimed), message="more than deflate can produce")]


def test_inflated_sizes_beyond_the_archive_are_refused_before_allocation(outcomes):
    assert_refused(outcomes, "claims")


# --------------------------------------------------------------------------------------------------------------
# (c) views that claim more elements than their storage holds


@family
def views(tmp):
    state_dict = random_state_dict(TINY_VIT)
    huge = torch.zeros(1, dtype=torch.float16).expand(1 << 31, 64)  # 2 ** 31 x 64 elements over one
    embedding = save_state_dict(tmp / "token-embedding.pt", dict(state_dict, **{"token_embedding.weight": huge}))
    mask = save_state_dict(tmp / "attn-mask.pt", dict(state_dict, attn_mask=torch.zeros(1).expand(10 ** 5, 10 ** 5)))
    # Through torch.load (an object our unpickler does not rebuild sends the file there): checked all the same.
    via_torch_load = tmp / "via-torch-load.pt"
    torch.save({"size": torch.Size([1]), "state_dict": dict(state_dict, **{"token_embedding.weight": huge})},
               via_torch_load)
    real_mask = save_state_dict(tmp / "mask.pt", dict(state_dict, attn_mask=torch.full((300, 300), -1.0).triu_(1)))
    return [Case(embedding, message="repeats elements of its storage"),
            Case(embedding, how="load", message="repeats elements of its storage"),
            Case(mask, message="repeats elements of its storage"),
            Case(via_torch_load, message="over a storage of 2 bytes"),
            Case(real_mask, message="attn_mask has shape (300, 300)")]


def test_views_beyond_their_storage_are_refused_before_materialising(outcomes):
    assert_refused(outcomes, "views")


# --------------------------------------------------------------------------------------------------------------
# (d) malformed values: each a CheckpointError naming the file and the cause


@family
def descriptions(tmp):
    storage = weights()
    cases = {
        "offset.pt": ({"w": Tensor(storage, 3, (4,), (1,))}, "reaches past its storage"),
        "size.pt": ({"w": Tensor(storage, 0, (5,), (1,))}, "reaches past its storage"),
        "stride.pt": ({"w": Tensor(storage, 0, (2, 2), (3, 1))}, "reaches past its storage"),
        "negative.pt": ({"w": Tensor(storage, 0, (2,), (-1,))}, "negative"),
        "not-ints.pt": ({"w": Tensor(storage, 0, ("2",), (1,))}, "not integers"),
        "float-size.pt": ({"w": Tensor(storage, 0, (2.0,), (1,))}, "not integers"),
        "mismatched.pt": ({"w": Tensor(storage, 0, (2, 2), (1,))}, "not integers"),
        "build.pt": ({"w": Tensor(storage, 0, (4,), (1,), build={"x": 1})}, "BUILD opcode on a tensor"),
        "numel.pt": ({"w": Tensor(Storage("0", storage.data, numel=5), 0, (4,), (1,))}, "has 16 bytes, expected 20"),
    }
    found = [Case(saved(tmp / name, obj), message=message) for name, (obj, message) in cases.items()]
    no_entry = write_zip(tmp / "no-entry.pt", dumps({"w": Tensor(storage, 0, (4,), (1,))}))
    return found + [Case(no_entry, message="which the zip lacks")]


def test_malformed_tensor_descriptions(outcomes):
    assert_refused(outcomes, "descriptions")


@family
def pickles(tmp):
    """Malformed pickles in whole zips: named as malformed, never sent to fetch the file again."""
    storage = weights()
    good = dumps({"w": Tensor(storage, 0, (4,), (1,))})
    cases = {
        "cut.pt": good[:-5],  # the zip is whole; its pickle stops early
        "reduce.pt": PROTO + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"N" + b"R" + STOP,  # args not a tuple
        "arity.pt": PROTO + b"ctorch._utils\n_rebuild_tensor_v2\n" + b")R" + STOP,
        "garbage.pt": PROTO + b"\xff\xfe" + STOP,
        "stack.pt": PROTO + b"s" + STOP,
        "setitem-on-object.pt": PROTO + b"ccollections\nOrderedDict\n" + b"Ns" + STOP,
    }
    found = [Case(write_zip(tmp / name, data, [storage], scripted=True), message="malformed", unsaid="fetch it again")
             for name, data in cases.items()]
    refused = write_zip(tmp / "evil.pt", PROTO + b"cos\nsystem\n" + _name("ls") + b"\x85R" + STOP, scripted=True)
    return found + [Case(refused, message="refusing to load os.system", unsaid="fetch it again")]


def test_malformed_pickles_are_named_malformed_not_truncated(outcomes):
    assert_refused(outcomes, "pickles")


@family
def storages(tmp):
    storage = weights()
    complex_storage = Storage("0", storage.data, numel=2, cls=torch.ComplexFloatStorage)
    odd = saved(tmp / "complex.pt", {"w": Tensor(complex_storage, 0, (2,), (1,))})
    encrypted = saved(tmp / "encrypted.pt", {"w": Tensor(storage, 0, (4,), (1,))})
    data = bytearray(open(encrypted, "rb").read())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at >= 0:
            data[at + flag_offset] |= 1  # general-purpose flag bit 0: encrypted
            at = data.find(signature, at + 4)
    open(encrypted, "wb").write(bytes(data))
    return [Case(odd, message="is not a readable CLIP checkpoint"), Case(encrypted, message="is encrypted")]


def test_odd_dtypes_and_encrypted_entries(outcomes):
    assert_refused(outcomes, "storages")


@family
def shapes(tmp):
    state_dict = random_state_dict(TINY_VIT)
    cases = {
        "projection-1d.pt": dict(text_projection=torch.zeros(64)),
        "projection-0d.pt": dict(text_projection=torch.tensor(1.0)),
        "conv-1d.pt": {"visual.conv1.weight": torch.zeros(64)},
        "patch-0.pt": {"visual.conv1.weight": torch.zeros(64, 3, 0, 0)},
        "positions-1.pt": {"visual.positional_embedding": torch.zeros(1, 64)},
        "width-63.pt": {"ln_final.weight": torch.zeros(63)},
        "ln-2d.pt": {"ln_final.weight": torch.zeros(64, 1)},
    }
    return [Case(save_state_dict(tmp / name, dict(state_dict, **change)), how="load",
                 message="is not a CLIP checkpoint") for name, change in cases.items()]


def test_tensors_of_the_wrong_rank_or_size_are_refused_by_load(outcomes):
    assert_refused(outcomes, "shapes")


def hf_folder(folder, layers=1, **text):
    import transformers

    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=1,
                 hidden_act="quick_gelu")
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, **text),
        vision_config=dict(tower, image_size=32, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    return folder


def changed_copy(folder, target, config_name, change) -> str:
    """A copy of a checkpoint folder whose configuration ``change`` edits in place."""
    target.mkdir()
    for file in folder.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((target / config_name).read_text())
    change(config)
    (target / config_name).write_text(json.dumps(config))
    return str(target)


@family
def configs(tmp):
    os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must not look anything up (this process is the test's)
    folder = hf_folder(tmp / "hf")
    cases = {
        "hidden-size-string": (lambda c: c["text_config"].update(hidden_size="64"), "hidden_size is '64'"),
        "tower-a-list": (lambda c: c.update(vision_config=[1, 2]), "vision_config is [1, 2], expected an object"),
        "heads-bool": (lambda c: c["vision_config"].update(num_attention_heads=True), "num_attention_heads is True"),
        "eps-a-dict": (lambda c: c["text_config"].update(layer_norm_eps={"a": 1}), "layer_norm_eps is {'a': 1}"),
    }
    found = [Case(changed_copy(folder, tmp / name, "config.json", change), message=message)
             for name, (change, message) in cases.items()]
    nested = tmp / "nested"
    nested.mkdir()
    (nested / "config.json").write_text('{"model_type": "clip", "text_config": ' + "[" * 10 ** 5 + "]" * 10 ** 5 + "}")
    return found + [Case(nested, message="nested too deeply")]


def test_malformed_configs(outcomes):
    assert_refused(outcomes, "configs")


# --------------------------------------------------------------------------------------------------------------
# (e) special files and misleading messages


@family
def special(tmp):
    fifo = tmp / "pipe.pt"
    os.mkfifo(fifo)
    loop = tmp / "loop.pt"
    os.symlink(loop, loop)
    from safetensors.torch import save_file

    whole = tmp / "whole.safetensors"
    save_file({"a": torch.zeros(1000)}, str(whole))
    cut = tmp / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:40])
    return [Case(fifo, message="a FIFO", unsaid="empty"), Case("/dev/zero", message="a character device"),
            Case(loop, message="a loop of symbolic links", unsaid="no checkpoint at"),
            Case(cut, message="is a truncated safetensors file")]


def test_special_files_are_named_for_what_they_are(outcomes):
    assert_refused(outcomes, "special")


# --------------------------------------------------------------------------------------------------------------
# (f) configurations that disagree with their weights


@family
def disagreements(tmp):
    from test_formats import open_clip_model, save_open_clip_folder

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = hf_folder(tmp / "hf")
    theirs, cfg = open_clip_model()
    open_clip = save_open_clip_folder(theirs, cfg, tmp / "oc")

    def text_cfg(**options):
        return lambda c: c["model_cfg"]["text_cfg"].update(options)

    return [
        Case(changed_copy(hf, tmp / "hf-layers", "config.json", lambda c: c["text_config"].update(
            num_hidden_layers=2)), message="text_config.num_hidden_layers=2 where the weights have 1"),
        Case(changed_copy(hf, tmp / "hf-width", "config.json", lambda c: c["vision_config"].update(
            hidden_size=128, intermediate_size=512, num_attention_heads=2)),
            message="vision_config.hidden_size=128 where the weights have 64"),
        Case(changed_copy(open_clip, tmp / "oc-layers", "open_clip_config.json", text_cfg(layers=3)),
             message="text_cfg.layers=3 where the weights have 2"),
        Case(changed_copy(open_clip, tmp / "oc-width", "open_clip_config.json", text_cfg(width=128, heads=2)),
             message="text_cfg.heads=2 where the weights have 1"),
    ]


def test_configurations_that_disagree_with_their_weights(outcomes):
    assert_refused(outcomes, "disagreements")

"""The edge and misuse cases of the original's behaviour table, and the runner that plays them on any ``clip``.

A case is data: an id, what to call (``target``), and its inputs described declaratively (``args``, ``kwargs``).
The runner turns the descriptions into real inputs (files, tensors, images, a local server), calls the target on
whichever ``clip`` package is importable, and describes what came back as JSON facts: the exception's class and
its bases, or the result's type, shape and dtype. ``tests/data/record_original.py`` runs it on the original and
writes ``tests/data/original-behaviour.json``; ``tests/test_original_table.py`` replays that table on this
package. Nothing here imports this package's private modules, so the same code runs on both.

Input descriptions (anywhere in ``args``/``kwargs``; plain JSON values are passed as they are):

- ``{"file": NAME}``: the path of a fixture file (see ``FILES``) as a str; ``"as": "bytes"`` or ``"pathlib"``
  for the other path types;
- ``{"tensor": {"shape": [...], "dtype": "float32"}}``: seeded random values (integer dtypes: zeros);
- ``{"tokens": {"length": L, "ends": [i, ...]}}``: micro-model token rows (start id 510, filler 100, end id 511
  at each row's index in ``ends``); ``"dtype"`` and ``"fill"`` override;
- ``{"image": {"size": [w, h], "mode": "RGB"}}``: a PIL image;
- ``{"state_dict": MODEL}`` (``"drop"``, ``"extra"``, ``"resize"`` change it): the micro archive's tensors;
- ``{"url": {"serve": FILE, "mode": "ok" | "missing" | "no-length"}}``: a URL of a server on 127.0.0.1 that
  serves the fixture at ``/<its sha256>/<its name>``; ``{"file_url": FILE, "sha256": "ok" | "wrong"}``.

Targets: a dotted name under ``clip`` (``"clip.tokenize"``), ``"model.<method>"`` on a model from
``clip.load(**case["model"])`` (``"attrs"`` are set on it first), ``"tokenizer.<method>"`` on a
``SimpleTokenizer()``, or ``"preprocess"`` to call ``_transform(case["n_px"])`` on the arguments.
"""
import contextlib
import hashlib
import http.server
import importlib
import inspect
import json
import os
import pathlib
import shutil
import socket
import threading
import warnings
from typing import Any, Dict, Iterator, List

import torch

HERE = pathlib.Path(__file__).resolve().parent
MICRO = HERE / "data" / "micro"
TABLE = HERE / "data" / "original-behaviour.json"
MODULES = ("clip", "clip.clip", "clip.model", "clip.simple_tokenizer")

# The micro archives' special ids (vocabulary 512): start of text, end of text (the highest id), and a filler.
START, END, FILLER = 510, 511, 100
HUGE_CONTEXT = 10 ** 12  # 4 TB of int32 (8 TB of int64): no machine allocates it, so both fail at once
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# The cases

def _case(case_id: str, target: str, *args: Any, **fields: Any) -> Dict[str, Any]:
    kwargs = fields.pop("kwargs", {})
    return {"id": case_id, "target": target, "args": list(args), "kwargs": kwargs, **fields}


VIT = {"name": {"file": "micro-vit"}, "device": "cpu"}
RN = {"name": {"file": "micro-rn"}, "device": "cpu"}
IMAGE = {"tensor": {"shape": [2, 3, 32, 32], "dtype": "float32"}}
TEXT = {"tokens": {"length": 77, "ends": [3, 9]}}

CASES: List[Dict[str, Any]] = [
    # available_models
    _case("available_models", "clip.available_models"),
    _case("available_models.extra_argument", "clip.available_models", "RN50"),
    # tokenize: texts
    _case("tokenize.str", "clip.tokenize", "a photo of a cat"),
    _case("tokenize.list", "clip.tokenize", ["a cat", "a dog", ""]),
    _case("tokenize.tuple", "clip.tokenize", ("a cat", "a dog")),
    _case("tokenize.empty_list", "clip.tokenize", []),
    _case("tokenize.empty_str", "clip.tokenize", ""),
    _case("tokenize.special_tokens", "clip.tokenize", "<|startoftext|> hi <|endoftext|>"),
    _case("tokenize.too_long", "clip.tokenize", "word " * 100),
    _case("tokenize.too_long_truncate", "clip.tokenize", "word " * 100, kwargs={"truncate": True}),
    _case("tokenize.huge_text_truncate", "clip.tokenize", "a " * 100000, kwargs={"truncate": True}),
    _case("tokenize.int", "clip.tokenize", 123),
    _case("tokenize.none", "clip.tokenize", None),
    _case("tokenize.list_with_int", "clip.tokenize", ["a cat", 1]),
    _case("tokenize.list_with_none", "clip.tokenize", ["a cat", None]),
    _case("tokenize.bytes", "clip.tokenize", {"bytes": "a cat"}),
    # tokenize: context lengths
    _case("tokenize.context_0", "clip.tokenize", ["a cat"], kwargs={"context_length": 0}),
    _case("tokenize.context_1", "clip.tokenize", ["a cat"], kwargs={"context_length": 1}),
    _case("tokenize.context_2_empty_text", "clip.tokenize", [""], kwargs={"context_length": 2}),
    _case("tokenize.context_3", "clip.tokenize", ["a cat"], kwargs={"context_length": 3}),
    _case("tokenize.context_negative", "clip.tokenize", ["a cat"], kwargs={"context_length": -1}),
    _case("tokenize.context_negative_no_texts", "clip.tokenize", [], kwargs={"context_length": -1}),
    _case("tokenize.context_0_no_texts", "clip.tokenize", [], kwargs={"context_length": 0}),
    _case("tokenize.context_0_truncate", "clip.tokenize", ["a cat"], kwargs={"context_length": 0, "truncate": True}),
    _case("tokenize.context_1_truncate", "clip.tokenize", ["a cat"], kwargs={"context_length": 1, "truncate": True}),
    _case("tokenize.context_3_truncate", "clip.tokenize", ["a cat"], kwargs={"context_length": 3, "truncate": True}),
    _case("tokenize.context_huge", "clip.tokenize", ["a cat"], kwargs={"context_length": HUGE_CONTEXT}),
    _case("tokenize.context_huge_truncate", "clip.tokenize", ["a cat"],
          kwargs={"context_length": HUGE_CONTEXT, "truncate": True}),
    _case("tokenize.context_100", "clip.tokenize", ["a cat"], kwargs={"context_length": 100}),
    _case("tokenize.context_float", "clip.tokenize", ["a cat"], kwargs={"context_length": 77.0}),
    _case("tokenize.context_str", "clip.tokenize", ["a cat"], kwargs={"context_length": "77"}),
    _case("tokenize.context_none", "clip.tokenize", ["a cat"], kwargs={"context_length": None}),
    # SimpleTokenizer
    _case("tokenizer.encode", "tokenizer.encode", "A photo of a CAT!"),
    _case("tokenizer.encode_empty", "tokenizer.encode", ""),
    _case("tokenizer.encode_special", "tokenizer.encode", "<|endoftext|>"),
    _case("tokenizer.encode_int", "tokenizer.encode", 1),
    _case("tokenizer.encode_none", "tokenizer.encode", None),
    _case("tokenizer.encode_bytes", "tokenizer.encode", {"bytes": "a cat"}),
    _case("tokenizer.decode", "tokenizer.decode", [320, 2368, 269]),
    _case("tokenizer.decode_empty", "tokenizer.decode", []),
    _case("tokenizer.decode_special", "tokenizer.decode", [49406, 49407]),
    _case("tokenizer.decode_unknown_id", "tokenizer.decode", [49408]),
    _case("tokenizer.decode_negative_id", "tokenizer.decode", [-1]),
    _case("tokenizer.decode_none", "tokenizer.decode", None),
    _case("tokenizer.bpe", "tokenizer.bpe", "hello"),
    _case("tokenizer.bpe_empty", "tokenizer.bpe", ""),
    _case("tokenizer.missing_vocabulary", "clip.simple_tokenizer.SimpleTokenizer", {"file": "missing"}),
    _case("tokenizer.vocabulary_folder", "clip.simple_tokenizer.SimpleTokenizer", {"file": "folder"}),
    _case("tokenizer.vocabulary_not_gzip", "clip.simple_tokenizer.SimpleTokenizer", {"file": "text-file"}),
    _case("tokenizer.vocabulary_none", "clip.simple_tokenizer.SimpleTokenizer", None),
    _case("tokenizer.vocabulary_pathlib", "clip.simple_tokenizer.SimpleTokenizer", {"file": "vocabulary",
                                                                                    "as": "pathlib"}),
    _case("tokenizer.default_bpe", "clip.simple_tokenizer.default_bpe"),
    _case("tokenizer.bytes_to_unicode", "clip.simple_tokenizer.bytes_to_unicode"),
    # load: names and paths
    _case("load.unknown_name", "clip.load", "no-such-model", kwargs={"device": "cpu"}),
    _case("load.empty_name", "clip.load", "", kwargs={"device": "cpu"}),
    _case("load.missing_path", "clip.load", {"file": "missing"}, kwargs={"device": "cpu"}),
    _case("load.missing_path_jit", "clip.load", {"file": "missing"}, kwargs={"device": "cpu", "jit": True}),
    _case("load.folder", "clip.load", {"file": "folder"}, kwargs={"device": "cpu"}),
    _case("load.int", "clip.load", 123, kwargs={"device": "cpu"}),
    _case("load.none", "clip.load", None, kwargs={"device": "cpu"}),
    _case("load.bytes_path", "clip.load", {"file": "micro-vit", "as": "bytes"}, kwargs={"device": "cpu"}),
    _case("load.pathlib", "clip.load", {"file": "micro-vit", "as": "pathlib"}, kwargs={"device": "cpu"}),
    _case("load.vit", "clip.load", {"file": "micro-vit"}, kwargs={"device": "cpu"}),
    _case("load.rn", "clip.load", {"file": "micro-rn"}, kwargs={"device": "cpu"}),
    _case("load.positional", "clip.load", {"file": "micro-vit"}, "cpu", False, None),
    _case("load.vit_jit", "clip.load", {"file": "micro-vit"}, kwargs={"device": "cpu", "jit": True}),
    _case("load.rn_jit", "clip.load", {"file": "micro-rn"}, kwargs={"device": "cpu", "jit": True}),
    _case("load.state_dict_file", "clip.load", {"file": "state-dict"}, kwargs={"device": "cpu"}),
    _case("load.state_dict_file_jit", "clip.load", {"file": "state-dict"}, kwargs={"device": "cpu", "jit": True}),
    _case("load.empty_file", "clip.load", {"file": "empty-file"}, kwargs={"device": "cpu"}),
    _case("load.text_file", "clip.load", {"file": "text-file"}, kwargs={"device": "cpu"}),
    _case("load.truncated_archive", "clip.load", {"file": "truncated-archive"}, kwargs={"device": "cpu"}),
    _case("load.not_clip_weights", "clip.load", {"file": "not-clip"}, kwargs={"device": "cpu"}),
    _case("load.list_pickle", "clip.load", {"file": "list-pickle"}, kwargs={"device": "cpu"}),
    # load: devices
    _case("load.device_torch_cpu", "clip.load", {"file": "micro-vit"}, kwargs={"device": {"device": "cpu"}}),
    _case("load.device_cpu_0", "clip.load", {"file": "micro-vit"}, kwargs={"device": "cpu:0"}),
    _case("load.device_none", "clip.load", {"file": "micro-vit"}, kwargs={"device": None}, needs="no-cuda"),
    _case("load.device_meta", "clip.load", {"file": "micro-vit"}, kwargs={"device": "meta"}),
    _case("load.device_meta_jit", "clip.load", {"file": "micro-vit"}, kwargs={"device": "meta", "jit": True}),
    _case("load.device_cuda", "clip.load", {"file": "micro-vit"}, kwargs={"device": "cuda"}, needs="no-cuda"),
    _case("load.device_cuda_jit", "clip.load", {"file": "micro-vit"}, kwargs={"device": "cuda", "jit": True},
          needs="no-cuda"),
    _case("load.device_cuda_index", "clip.load", {"file": "micro-vit"}, kwargs={"device": 0}, needs="no-cuda"),
    _case("load.device_unknown", "clip.load", {"file": "micro-vit"}, kwargs={"device": "gpu"}),
    # load and _download of release names and URLs: only cases that fail before any network, or 127.0.0.1
    _case("load.release_root_is_file", "clip.load", "RN50", kwargs={"device": "cpu",
                                                                   "download_root": {"file": "text-file"}}),
    _case("load.release_target_is_folder", "clip.load", "RN50",
          kwargs={"device": "cpu", "download_root": {"file": "cache-with-folder"}}),
    _case("download.served", "clip.clip._download", {"url": {"serve": "micro-vit"}}, {"file": "new-folder"}),
    _case("download.missing_on_server", "clip.clip._download", {"url": {"serve": "micro-vit", "mode": "missing"}},
          {"file": "new-folder"}),
    _case("download.no_content_length", "clip.clip._download",
          {"url": {"serve": "micro-vit", "mode": "no-length"}}, {"file": "new-folder"}),
    _case("download.file_url", "clip.clip._download", {"file_url": "micro-vit"}, {"file": "new-folder"}),
    _case("download.file_url_wrong_sha256", "clip.clip._download", {"file_url": "micro-vit", "sha256": "wrong"},
          {"file": "new-folder"}),
    _case("download.root_is_file", "clip.clip._download", {"url": {"serve": "micro-vit"}}, {"file": "text-file"}),
    _case("download.target_is_folder", "clip.clip._download", {"url": {"serve": "RN50.pt"}},
          {"file": "cache-with-folder"}),
    _case("download.not_a_url", "clip.clip._download", "not-a-url", {"file": "new-folder"}),
    _case("download.root_none", "clip.clip._download", {"url": {"serve": "micro-vit"}}, None),
    # _transform and preprocessing
    _case("transform.rgb", "preprocess", {"image": {"size": [50, 80]}}, n_px=224),
    _case("transform.gray", "preprocess", {"image": {"size": [40, 30], "mode": "L"}}, n_px=32),
    _case("transform.rgba", "preprocess", {"image": {"size": [40, 30], "mode": "RGBA"}}, n_px=32),
    _case("transform.palette", "preprocess", {"image": {"size": [40, 30], "mode": "P"}}, n_px=32),
    _case("transform.one_pixel", "preprocess", {"image": {"size": [1, 1]}}, n_px=224),
    _case("transform.size_0", "preprocess", {"image": {"size": [50, 80]}}, n_px=0),
    _case("transform.size_negative", "preprocess", {"image": {"size": [50, 80]}}, n_px=-1),
    _case("transform.size_none", "preprocess", {"image": {"size": [50, 80]}}, n_px=None),
    _case("transform.tensor_input", "preprocess", {"tensor": {"shape": [3, 40, 40], "dtype": "float32"}}, n_px=32),
    _case("transform.compose", "clip.clip._transform", 224),
    _case("transform.convert_tensor", "clip.clip._convert_image_to_rgb",
          {"tensor": {"shape": [3, 4, 4], "dtype": "float32"}}),
    # build_model
    _case("build_model.vit", "clip.model.build_model", {"state_dict": "micro-vit"}),
    _case("build_model.rn", "clip.model.build_model", {"state_dict": "micro-rn"}),
    _case("build_model.empty", "clip.model.build_model", {}),
    _case("build_model.none", "clip.model.build_model", None),
    _case("build_model.list", "clip.model.build_model", []),
    _case("build_model.missing_key", "clip.model.build_model", {"state_dict": "micro-vit",
                                                               "drop": ["text_projection"]}),
    _case("build_model.missing_weight", "clip.model.build_model", {"state_dict": "micro-vit",
                                                                  "drop": ["ln_final.bias"]}),
    _case("build_model.extra_key", "clip.model.build_model", {"state_dict": "micro-vit",
                                                             "extra": ["visual.extra.weight"]}),
    _case("build_model.wrong_shape", "clip.model.build_model", {"state_dict": "micro-vit",
                                                               "resize": {"token_embedding.weight": [512, 32]}}),
    _case("build_model.prefixed_keys", "clip.model.build_model", {"state_dict": "micro-vit", "prefix": "module."}),
    _case("build_model.from_clip_clip", "clip.clip.build_model", {"state_dict": "micro-vit"}),
    # encode_image
    _case("encode_image.vit", "model.encode_image", IMAGE, model=VIT),
    _case("encode_image.rn", "model.encode_image", IMAGE, model=RN),
    _case("encode_image.vit_jit", "model.encode_image", IMAGE, model={**VIT, "jit": True}),
    _case("encode_image.empty_batch", "model.encode_image", {"tensor": {"shape": [0, 3, 32, 32]}}, model=VIT),
    _case("encode_image.unbatched", "model.encode_image", {"tensor": {"shape": [3, 32, 32]}}, model=VIT),
    _case("encode_image.wrong_size_vit", "model.encode_image", {"tensor": {"shape": [1, 3, 64, 64]}}, model=VIT),
    _case("encode_image.wrong_size_rn", "model.encode_image", {"tensor": {"shape": [1, 3, 64, 64]}}, model=RN),
    _case("encode_image.one_channel", "model.encode_image", {"tensor": {"shape": [1, 1, 32, 32]}}, model=VIT),
    _case("encode_image.uint8", "model.encode_image", {"tensor": {"shape": [1, 3, 32, 32], "dtype": "uint8"}},
          model=VIT),
    _case("encode_image.float64", "model.encode_image", {"tensor": {"shape": [1, 3, 32, 32], "dtype": "float64"}},
          model=VIT),
    _case("encode_image.float16", "model.encode_image", {"tensor": {"shape": [1, 3, 32, 32], "dtype": "float16"}},
          model=VIT),
    _case("encode_image.meta", "model.encode_image", {"tensor": {"shape": [2, 3, 32, 32], "device": "meta"}},
          model={**VIT, "device": "meta"}),
    # encode_text
    _case("encode_text.vit", "model.encode_text", TEXT, model=VIT),
    _case("encode_text.rn", "model.encode_text", TEXT, model=RN),
    _case("encode_text.vit_jit", "model.encode_text", TEXT, model={**VIT, "jit": True}),
    _case("encode_text.int32", "model.encode_text", {"tokens": {"length": 77, "ends": [3], "dtype": "int32"}},
          model=VIT),
    _case("encode_text.float_tokens", "model.encode_text",
          {"tokens": {"length": 77, "ends": [3], "dtype": "float32"}}, model=VIT),
    _case("encode_text.empty_batch", "model.encode_text", {"tokens": {"length": 77, "ends": []}}, model=VIT),
    _case("encode_text.unbatched", "model.encode_text", {"tokens": {"length": 77, "ends": [3], "rows": None}},
          model=VIT),
    _case("encode_text.no_end_token", "model.encode_text", {"tokens": {"length": 77, "ends": [None]}}, model=VIT),
    _case("encode_text.id_out_of_vocabulary", "model.encode_text",
          {"tokens": {"length": 77, "ends": [3], "fill": 600}}, model=VIT),
    _case("encode_text.negative_id", "model.encode_text", {"tokens": {"length": 77, "ends": [3], "fill": -1}},
          model=VIT),
    _case("encode_text.context_10", "model.encode_text", {"tokens": {"length": 10, "ends": [3]}}, model=VIT),
    _case("encode_text.context_100_short_text", "model.encode_text", {"tokens": {"length": 100, "ends": [3]}},
          model=VIT),
    _case("encode_text.context_100_92_tokens", "model.encode_text", {"tokens": {"length": 100, "ends": [91]}},
          model=VIT),
    _case("encode_text.context_100_untrimmed", "model.encode_text", {"tokens": {"length": 100, "ends": [3]}},
          model=VIT, attrs={"trim_text": False}),
    _case("encode_text.context_100_jit", "model.encode_text", {"tokens": {"length": 100, "ends": [3]}},
          model={**VIT, "jit": True}),
    _case("encode_text.meta", "model.encode_text", {"tokens": {"length": 77, "ends": [3, 9], "device": "meta"}},
          model={**VIT, "device": "meta"}),
    # forward
    _case("forward.vit", "model.forward", IMAGE, TEXT, model=VIT),
    _case("forward.rn_jit", "model.forward", IMAGE, TEXT, model={**RN, "jit": True}),
    _case("forward.batch_mismatch", "model.forward", IMAGE, {"tokens": {"length": 77, "ends": [3, 4, 5]}},
          model=VIT),
]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the files and the server the cases name

class Fixtures:
    """Fixture files in ``folder`` (made on first use) and a server on 127.0.0.1 serving some of them."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._made: Dict[str, str] = {}
        self._server = None

    def path(self, name: str) -> str:
        if name == "new-folder":  # a folder of its own for each use, so that no case sees another's download
            name = f"new-folder-{len(self._made)}"
        if name not in self._made:
            self._made[name] = str(self._make(name))
        return self._made[name]

    def _make(self, name: str) -> pathlib.Path:
        path = self.folder / name
        if name in ("micro-vit", "micro-rn"):
            shutil.copyfile(MICRO / f"{name}.pt", path)
        elif name == "vocabulary":
            clip = importlib.import_module("clip.simple_tokenizer")
            shutil.copyfile(clip.default_bpe(), path)
        elif name == "state-dict":
            torch.save(self.state_dict("micro-vit"), path)
        elif name == "empty-file":
            path.write_bytes(b"")
        elif name == "text-file":
            path.write_text("not a checkpoint\n")
        elif name == "truncated-archive":
            data = (MICRO / "micro-vit.pt").read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif name == "not-clip":
            torch.save({"layer.weight": torch.zeros(2, 2)}, path)
        elif name == "list-pickle":
            torch.save([torch.zeros(2)], path)
        elif name == "folder":
            path.mkdir()
        elif name.startswith("new-folder"):
            path.mkdir()
            path = path / "cache"  # not there yet: _download makes it
        elif name == "cache-with-folder":
            (path / "RN50.pt").mkdir(parents=True)
        elif name == "missing":
            path = path / "model.pt"
        elif name == "RN50.pt":
            path.write_bytes(b"not the release")
        else:
            raise KeyError(f"no fixture {name!r}")
        return path

    def state_dict(self, model: str) -> Dict[str, torch.Tensor]:
        archive = torch.jit.load(str(MICRO / f"{model}.pt"), map_location="cpu")
        return {key: value.clone() for key, value in archive.state_dict().items()}

    def url(self, serve: str, mode: str = "ok") -> str:
        path = pathlib.Path(self.path(serve))
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        if self._server is None:
            self._server = _serve(self.folder)
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/{mode}/{sha256}/{path.name}"

    def file_url(self, name: str, sha256: str = "ok") -> str:
        path = pathlib.Path(self.path(name))
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if sha256 == "ok" else "0" * 64
        folder = self.folder / "by-hash" / digest
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)
        return (folder / path.name).as_uri()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _serve(folder: pathlib.Path) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1: ``/<mode>/<sha256>/<name>`` answers with the fixture file ``name``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            _, mode, _, name = self.path.split("/", 3)
            path = folder / name
            if mode == "missing" or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            if mode != "no-length":
                self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ----------------------------------------------------------------------------------------------------------------
# Inputs

def build(value: Any, fixtures: Fixtures) -> Any:
    """The real input a description stands for."""
    if isinstance(value, list):
        return [build(item, fixtures) for item in value]
    if isinstance(value, tuple):
        return tuple(build(item, fixtures) for item in value)
    if not isinstance(value, dict) or not value:
        return value
    kind = next(iter(value))  # a description's first key says what it describes
    return _BUILDERS[kind](value, value[kind], fixtures)


def _file(value: dict, name: str, fixtures: Fixtures) -> Any:
    path = fixtures.path(name)
    kind = value.get("as", "str")
    return {"str": path, "bytes": os.fsencode(path), "pathlib": pathlib.Path(path)}[kind]


def _tensor(value: dict, spec: dict, fixtures: Fixtures) -> torch.Tensor:
    dtype = getattr(torch, spec.get("dtype", "float32"))
    generator = torch.Generator().manual_seed(SEED)
    if dtype.is_floating_point:
        tensor = torch.randn(spec["shape"], generator=generator).to(dtype)
    else:
        tensor = torch.zeros(spec["shape"], dtype=dtype)
    return tensor.to(spec.get("device", "cpu"))


def _tokens(value: dict, spec: dict, fixtures: Fixtures) -> torch.Tensor:
    ends, length = spec["ends"], spec["length"]
    rows = torch.zeros(len(ends), length, dtype=torch.long)
    for row, end in zip(rows, ends):
        row[0] = START
        if end is not None:
            row[1:end] = spec.get("fill", FILLER)
            row[end] = END
    if "rows" in spec and spec["rows"] is None:
        rows = rows[0]  # one unbatched row
    return rows.to(getattr(torch, spec.get("dtype", "int64"))).to(spec.get("device", "cpu"))


def _image(value: dict, spec: dict, fixtures: Fixtures) -> Any:
    from PIL import Image

    width, height = spec["size"]
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    image = Image.frombytes("RGB", (width, height), bytes(pixels.flatten().tolist()))
    mode = spec.get("mode", "RGB")
    return image.convert(mode) if mode != "P" else image.convert("P", palette=Image.Palette.ADAPTIVE)


def _state_dict(value: dict, model: str, fixtures: Fixtures) -> Dict[str, torch.Tensor]:
    state_dict = fixtures.state_dict(model)
    for key in value.get("drop", []):
        del state_dict[key]
    for key in value.get("extra", []):
        state_dict[key] = torch.zeros(2)
    for key, shape in value.get("resize", {}).items():
        state_dict[key] = torch.zeros(shape, dtype=state_dict[key].dtype)
    prefix = value.get("prefix", "")
    return {prefix + key: tensor for key, tensor in state_dict.items()}


_BUILDERS = {
    "file": _file,
    "tensor": _tensor,
    "tokens": _tokens,
    "image": _image,
    "state_dict": _state_dict,
    "bytes": lambda value, text, fixtures: text.encode(),
    "device": lambda value, name, fixtures: torch.device(name),
    "url": lambda value, spec, fixtures: fixtures.url(spec["serve"], spec.get("mode", "ok")),
    "file_url": lambda value, name, fixtures: fixtures.file_url(name, value.get("sha256", "ok")),
}


# ----------------------------------------------------------------------------------------------------------------
# Running a case, describing what came back

def run(case: Dict[str, Any], fixtures: Fixtures) -> Dict[str, Any]:
    """Play one case; its outcome as JSON facts (see :func:`describe` and :func:`describe_error`)."""
    with warnings.catch_warnings(record=True) as caught, _local_network_only():
        warnings.simplefilter("always")
        try:
            call = _target(case, fixtures)
            args = build(case["args"], fixtures)
            kwargs = {key: build(value, fixtures) for key, value in case["kwargs"].items()}
            result = {"returns": describe(call(*args, **kwargs))}
        except Exception as e:  # the outcome being recorded, whatever it is
            result = {"raises": describe_error(e)}
    # Deprecation notices depend on the torch version, and the original leaks file handles (ResourceWarning).
    categories = {w.category for w in caught
                  if not issubclass(w.category, (DeprecationWarning, FutureWarning, ResourceWarning))}
    if categories:
        result["warns"] = sorted(_qualname(c) for c in categories)
        result["warning_classes"] = categories  # for the replay; not part of the table
    return result


def _target(case: Dict[str, Any], fixtures: Fixtures) -> Any:
    target = case["target"]
    if target.startswith("model."):
        spec = {key: build(value, fixtures) for key, value in case["model"].items()}
        model, _ = importlib.import_module("clip").load(**spec)
        for name, value in case.get("attrs", {}).items():
            setattr(model, name, value)
        return getattr(model, target.split(".", 1)[1])
    if target.startswith("tokenizer."):
        tokenizer = importlib.import_module("clip.simple_tokenizer").SimpleTokenizer()
        return getattr(tokenizer, target.split(".", 1)[1])
    if target == "preprocess":
        return importlib.import_module("clip.clip")._transform(case["n_px"])
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def describe(value: Any) -> Dict[str, Any]:
    """A returned value as facts: tensors by shape and dtype, modules by class, dtypes and devices."""
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype), "device": value.device.type}}
    if isinstance(value, torch.nn.Module):
        tensors = list(value.parameters()) + list(value.buffers())
        return {"module": {"class": type(value).__name__, "training": value.training,
                           "dtypes": sorted({str(t.dtype) for t in tensors if t.is_floating_point()}),
                           "devices": sorted({t.device.type for t in tensors})}}
    if isinstance(value, tuple):
        return {"tuple": [describe(item) for item in value]}
    if isinstance(value, (bool, int, float)) or value is None:
        return {"value": value}
    if isinstance(value, str):
        return {"str": "path" if os.path.isabs(value) else value}
    if isinstance(value, list) and all(isinstance(item, (str, int)) for item in value):
        return {"value": value}
    if isinstance(value, dict):
        return {"dict": {"len": len(value)}}
    transforms = getattr(value, "transforms", None)
    if isinstance(transforms, list):
        return {"object": type(value).__name__, "transforms": [type(t).__name__ if not inspect.isfunction(t)
                                                               else "function" for t in transforms]}
    return {"object": type(value).__name__}


def describe_error(error: BaseException) -> Dict[str, Any]:
    """An exception as its class and the classes it derives from (qualified names)."""
    return {"class": _qualname(type(error)), "mro": [_qualname(c) for c in type(error).__mro__]}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def _local_network_only() -> Iterator[None]:
    """Refuse, loudly, any connection or name lookup that is not for 127.0.0.1 (no case may reach further)."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost"):
            raise NetworkRefused(f"a case tried to reach {address}")
        return connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", None):
            raise NetworkRefused(f"a case tried to look up {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo


class NetworkRefused(BaseException):
    """Raised by the guard above; a BaseException so that no retry loop swallows it."""


# ----------------------------------------------------------------------------------------------------------------
# Names and signatures

def names() -> Dict[str, Dict[str, Any]]:
    """Every name of the four modules (and the members classes define there): kind, and signature if callable."""
    table: Dict[str, Dict[str, Any]] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            if name.startswith("__") and name.endswith("__") and name != "__all__":
                continue
            value = getattr(module, name)
            table[f"{module_name}.{name}"] = describe_name(value)
            if inspect.isclass(value) and value.__module__ == module_name:
                for member, attribute in sorted(vars(value).items()):
                    if member.startswith("__") and member != "__init__":
                        continue
                    table[f"{module_name}.{name}.{member}"] = describe_name(attribute)
    return table


def describe_name(value: Any) -> Dict[str, Any]:
    if inspect.ismodule(value):
        return {"kind": "module"}
    if isinstance(value, (staticmethod, classmethod)):
        return {"kind": type(value).__name__, "parameters": _parameters(value.__func__)}
    if isinstance(value, property):
        return {"kind": "property"}
    if inspect.isclass(value):
        return {"kind": "class", "parameters": _parameters(value)}
    if callable(value):
        return {"kind": "function", "parameters": _parameters(value)}
    return {"kind": "value", "type": type(value).__name__}


def _parameters(function: Any) -> Any:
    """``[[name, kind, has default], ...]``, or None where Python cannot tell the signature."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, p.default is not inspect.Parameter.empty] for p in signature.parameters.values()]


def record(folder: pathlib.Path) -> Dict[str, Any]:
    """The whole table: names, and every case's outcome, played on the importable ``clip``."""
    fixtures = Fixtures(folder)
    try:
        cases = []
        for case in CASES:
            outcome = run(case, fixtures)
            outcome.pop("warning_classes", None)
            cases.append({**case, **outcome})
    finally:
        fixtures.close()
    return {"names": names(), "cases": cases}


def load_table() -> Dict[str, Any]:
    return json.loads(TABLE.read_text(encoding="utf-8"))


"""What a command that runs a model reads, found before torch is imported: its images or texts, and its model's file
and identity (what ``clip embed`` records). Every check that needs no model runs here first, so a wrong path, an
unknown name or a model missing from an offline cache is an error in a fraction of a second, before any work.
"""
import hashlib
import os
import stat
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

from . import _cache, _files, _registry
from ._console import CLIError, printable, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Bytes read at a time when a checkpoint file is hashed.
HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Images and texts


def list_images(folder: str) -> List[str]:
    """The image files under ``folder``, recursively, as sorted paths relative to it with ``/`` separators.

    Only regular files (or links to them) count: a FIFO or device named ``x.png`` is skipped with a warning, since
    reading it could block forever. The order depends only on the names, so every machine cuts the same shards.
    """
    found = []
    for directory, _, files in os.walk(folder):
        for name in files:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(directory, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as error:  # a dangling link, a link loop
                warn(f"skipping {printable(path)}: {error.strerror or error}")
                continue
            if not regular:
                warn(f"skipping {printable(path)}: not a regular file")
                continue
            found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return sorted(found)


def image_paths(inputs: Sequence[str]) -> List[str]:
    """Expand folders into their images; fail on a path that does not exist, before any model is loaded."""
    paths, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = list_images(item)
            if not found:
                raise CLIError(f"no images in folder {printable(item)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            paths += [os.path.join(item, name) for name in found]
        elif os.path.exists(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        raise CLIError(f"image not found: {', '.join(map(printable, missing))}")
    return paths


def nonblank_lines(lines: Iterable[str]) -> List[str]:
    """The lines with surrounding white space stripped, blank ones left out."""
    return [line for line in map(str.strip, lines) if line]


def read_lines(path: str) -> List[str]:
    """The non-blank lines of a UTF-8 text file; a byte-order mark (Windows editors write one) is not text. Only a
    regular file is read (a FIFO would block).

    Raises ``UnicodeDecodeError`` or ``OSError``, for the caller to word.
    """
    with open(_files.open_regular(path, follow_links=True), encoding="utf-8-sig") as f:
        return nonblank_lines(f)


def read_texts(path: str) -> List[str]:
    try:
        return read_lines(path)
    except UnicodeDecodeError as error:
        raise CLIError(f"{printable(path)} is not UTF-8 text ({error}); clip embed takes a folder of images or a "
                       "text file with one text per line") from None
    except OSError as error:
        raise CLIError(f"cannot read {printable(path)}: {error.strerror or error}") from None


def embed_inputs(path: str) -> Tuple[str, List[str]]:
    """("images", paths relative to the folder) or ("texts", lines) for an embed INPUT."""
    if os.path.isdir(path):
        images = list_images(path)
        if not images:
            raise CLIError(f"no images in folder {printable(path)} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                           "recursively)")
        return "images", images
    if not os.path.exists(path):
        raise CLIError(f"input not found: {printable(path)}")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        raise CLIError(f"{printable(path)} is an image; clip embed takes a folder of images or a text file with one "
                       "text per line (use clip classify for single images)")
    texts = read_texts(path)
    if not texts:
        raise CLIError(f"no texts in {printable(path)}: write one text per line")
    return "texts", texts


def listing_digest(items: Sequence[str]) -> str:
    """The SHA-256 of an input listing (the sorted relative image paths, or the texts), each item ended by NUL,
    which no name or text line holds; a name that is not UTF-8 counts by its bytes."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The model


class Model(NamedTuple):
    """What ``--model`` names: a release (its registry key and URL) or a checkpoint path (``url`` None)."""

    name: str
    url: Optional[str]


def find_model(name: str) -> Model:
    """The release or path ``name`` means, in ``clip.load``'s order: an exact registry key, then an existing path,
    then another spelling of a release name; ``CLIError`` with load()'s suggestions for anything else.

    The registry is ``_registry.MODELS``, looked up at call time (tests point it at files on 127.0.0.1).
    """
    models = _registry.MODELS
    if name in models:
        return Model(name, models[name])
    path = os.path.expanduser(name)
    if os.path.lexists(path):
        return Model(path, None)
    release = _registry.release_name(name, models)
    if release is None:
        raise CLIError(_registry.not_found_message(name, models))
    return Model(release, models[release])


def model_identity(model: Model) -> Tuple[str, str]:
    """(the model's name for a record, ``sha256:<hex>`` of its checkpoint), without loading or downloading it.

    A release is named by its registry key and identified by the SHA-256 its URL carries (the cache verifies the
    file against it). A path is named by its file name, not the folder (mounts differ between machines), and
    identified by the SHA-256 of its content, a folder's by its files' names and contents: a second per GB, and
    the same on every machine and for every copy, which a size and a time would not be.
    """
    if model.url is not None:
        return model.name, "sha256:" + _cache.sha256_from_url(model.url)
    digest = hashlib.sha256()
    try:
        if os.path.isdir(model.name):
            for directory, folders, files in os.walk(model.name):
                folders.sort()
                for file in sorted(files):
                    path = os.path.join(directory, file)
                    digest.update(os.path.relpath(path, model.name).encode("utf-8", "surrogateescape") + b"\0")
                    _hash_file(path, digest)
        else:
            _hash_file(model.name, digest)
    except OSError as error:
        raise CLIError(f"cannot read the checkpoint {printable(model.name)}: {printable(str(error.strerror or error))}"
                       ) from None
    return os.path.basename(os.path.normpath(model.name)), "sha256:" + digest.hexdigest()


def _hash_file(path: str, digest: "hashlib._Hash") -> None:
    with open(_files.open_regular(path, follow_links=True), "rb") as file:  # a FIFO never blocks the hash
        for chunk in iter(lambda: file.read(HASH_CHUNK), b""):
            digest.update(chunk)


def model_file(model: Model, download_root: Optional[str]) -> str:
    """The checkpoint's local file: a path as it is, a release from the cache (downloaded and verified if it is not
    there, or the cache's offline error), all before torch is imported."""
    if model.url is None:
        return model.name
    try:
        return _cache.download(model.url, _cache.cache_dir(download_root))
    except (RuntimeError, OSError) as error:  # DownloadError, and a cache folder that cannot be made
        raise CLIError(str(error)) from None

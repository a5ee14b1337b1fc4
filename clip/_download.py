"""Placeholder: replaced by the download and cache module."""
import hashlib
import os
import urllib.request
from typing import Optional


def cache_dir(root: Optional[str] = None) -> str:
    if root is not None:
        return os.path.expanduser(os.fspath(root))
    if os.environ.get("CLIP_CACHE_DIR"):
        return os.path.expanduser(os.environ["CLIP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "clip")


def download(url: str, root: Optional[str] = None, *, sha256: Optional[str] = None) -> str:
    root = cache_dir(root)
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url))
    expected = sha256 or url.split("/")[-2]
    if os.path.isfile(target):
        return target
    tmp = target + ".part"
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        os.remove(tmp)
        raise RuntimeError(f"SHA-256 of {url} does not match")
    os.replace(tmp, target)
    return target

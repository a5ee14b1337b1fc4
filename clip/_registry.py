"""The release table (name, URL with its SHA-256, approximate size), the other spellings of a release name, the
closest names to an unknown one, and the file name of a URL. It must never import torch: the command line lists and
looks up models without it.
"""
import difflib
import posixpath
import urllib.parse
from typing import Dict, List, Optional

# The release checkpoints. The folder in each URL is the SHA-256 of the file, which downloads are verified against.
MODELS: Dict[str, str] = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# Approximate sizes of the release files in bytes (to the nearest MB or 10 MB, as published), by file name: shown
# before a download, and the basis of a bound on one.
APPROXIMATE_SIZES: Dict[str, int] = {
    "RN50.pt": 256_000_000, "RN101.pt": 292_000_000, "RN50x4.pt": 422_000_000, "RN50x16.pt": 661_000_000,
    "RN50x64.pt": 1_350_000_000, "ViT-B-32.pt": 354_000_000, "ViT-B-16.pt": 351_000_000,
    "ViT-L-14.pt": 933_000_000, "ViT-L-14-336px.pt": 934_000_000,
}


def normalise(name: str) -> str:
    """A name in a comparable form: case-insensitive, the file spelling ("ViT-B-32") equal to the registry's."""
    return name.lower().replace("/", "-").replace("@", "-")


def release_name(name: str, models: Dict[str, str]) -> Optional[str]:
    """The key of ``models`` that ``name`` spells in another way ("vit-b-32" for "ViT-B/32"), if any."""
    wanted = normalise(name)
    return next((m for m in models if normalise(m) == wanted), None)


def close_names(name: str, models: Dict[str, str]) -> List[str]:
    """Up to three keys of ``models`` that ``name`` may have been meant as, closest first."""
    spellings = {normalise(m): m for m in models}
    # cutoff 0.5: "ViT-B/33" and "rn5o" find their release; an unrelated word finds none.
    return [spellings[close] for close in difflib.get_close_matches(normalise(name), list(spellings), n=3, cutoff=0.5)]


def not_found_message(name: str, models: Dict[str, str]) -> str:
    """``load()``'s error for a name that is neither a key of ``models``, another spelling of one, nor a path."""
    suggestion = close_names(name, models)
    hint = f" Did you mean {' or '.join(map(repr, suggestion))}?" if suggestion else ""
    return (f"Model {name} not found.{hint} Available models = {list(models)}; a checkpoint can also be given by "
            f"its file path")


def file_name(url: str) -> str:
    """The file a URL names: its last path segment (``.../<sha256>/ViT-B-32.pt`` gives ``ViT-B-32.pt``)."""
    return posixpath.basename(urllib.parse.urlsplit(url).path)

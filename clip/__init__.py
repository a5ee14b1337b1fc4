"""A fast, trustworthy drop-in replacement for OpenAI's ``clip`` package.

``import clip; model, preprocess = clip.load("ViT-B/32")`` works as with the original; see ``clip.clip``.
"""
from .clip import *  # noqa: F401,F403  (the original's public names: available_models, load, tokenize)

__version__ = "1.0.0"

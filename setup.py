"""Packaging for the drop-in ``clip`` package.

The distribution is named ``clip-dropin`` so that it never collides with the unrelated PyPI project called
``clip``; it installs the importable package ``clip``. Nothing from the package is imported here: the version
is read from ``clip/__init__.py`` as text.
"""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def read_version() -> str:
    text = (HERE / "clip" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def read_requirements() -> list:
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = (line.split("#", 1)[0].strip() for line in lines)  # drop comments, whole-line and inline
    return [r for r in requirements if r]


setup(
    name="clip-dropin",
    version=read_version(),
    description="A fast, trustworthy drop-in replacement for OpenAI's CLIP package",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    # README, "Supported versions": 3.11, 3.13 and 3.14 tested; 3.12 untested (no Debian suite ships it); 3.10 is
    # past its end of life, and torch 2.15 needs 3.11.
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: 3.14",
    ],
    packages=find_packages(exclude=["tests*", "benchmarks*"]),
    # The clip command starts outside the package, so it can check the package's files before importing them.
    py_modules=["clip_dropin_launcher"],
    install_requires=read_requirements(),
    extras_require={
        "safetensors": ["safetensors>=0.4"],
        # Each entry installs with every supported torch (2.4 on).
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "numpy",
            "safetensors>=0.4",
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel",
            # [torch] declares the torch each release needs (5.18: torch>=2.5, 5.25: torch>=2.6), so pip
            # picks one that runs with the installed torch (4.57 for torch 2.4); plain transformers 5 installs
            # beside torch 2.4 and then disables its PyTorch models.
            "transformers[torch]>=4.30",
            "open_clip_torch>=2.20",
            "matplotlib>=3.5",
            # The wheel and sdist tests build with --no-build-isolation, from what is installed: pyproject.toml's
            # build requirements, not left to whether torch happens to bring setuptools.
            "setuptools>=70.1",
            "wheel",
            # The cluster recipes' engines, run by tests/test_cluster.py (about 100 s to install together).
            "pyspark>=3.5",
            "ray[data]>=2.9",
        ],
        "notebooks": ["matplotlib>=3.5", "jupyter"],
    },
    entry_points={"console_scripts": ["clip=clip_dropin_launcher:main"]},
    package_data={"clip": ["bpe_simple_vocab_16e6.txt.gz"]},
    include_package_data=True,
)

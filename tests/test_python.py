"""The Python the suite runs on: one the package claims, where the default path warns nothing and a run of the
suite ends without a traceback (README, "Supported versions")."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = (REPO / "setup.py").read_text(encoding="utf-8")


def test_this_python_is_claimed():
    """setup.py's floor and classifiers name this Python: running the suite on an unclaimed one says so."""
    floor = re.search(r'python_requires=">=3\.(\d+)"', SETUP).group(1)
    claimed = set(re.findall(r'"Programming Language :: Python :: 3\.(\d+)"', SETUP))
    assert sys.version_info[:2] >= (3, int(floor))
    assert str(sys.version_info.minor) in claimed, f"Python 3.{sys.version_info.minor} is not among the classifiers"
    assert min(map(int, claimed)) == int(floor)


@pytest.mark.parametrize("name", ["micro-vit", "micro-rn"])
def test_load_without_jit_warns_nothing(data_dir, name):
    """``clip.load(path)`` (jit=False, the default) and both encoders, in a fresh interpreter with every warning an
    error: nothing the package does by default may warn on this Python (torch warns on every torch.jit.load from
    Python 3.14 on; the original calls it first on every load)."""
    code = textwrap.dedent(f"""
        import torch, clip
        model, preprocess = clip.load({str(data_dir / "micro" / (name + ".pt"))!r}, device="cpu")
        size = preprocess.transforms[1].size[0]
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, size, size))
            # the micro models' start and end ids (vocabulary 512: tests/data/README.md)
            model.encode_text(torch.tensor([[510, 100, 511] + [0] * (model.context_length - 3)]))
    """)
    result = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", code], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert (result.returncode, result.stderr) == (0, "")


def test_a_run_that_used_a_forkserver_ends_without_a_traceback(tmp_path):
    """multiprocessing removes its own folder (pymp-*, in the run's TMPDIR) at exit; the run's folder must still be
    there then, and gone after. The forkserver, Python 3.14's default start method, makes that folder."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", run / "conftest.py")
    (run / "test_pool.py").write_text(textwrap.dedent("""
        import multiprocessing, os, pathlib

        def test_pool():
            with multiprocessing.get_context("forkserver").Pool(1) as pool:
                assert pool.map(abs, [-1]) == [1]
            assert any(pathlib.Path(os.environ["TMPDIR"]).glob("pymp-*"))
            pathlib.Path(os.environ["REPORT"]).write_text(os.path.dirname(os.environ["TMPDIR"]))
    """))
    report = tmp_path / "report"
    env = {**os.environ, "REPORT": str(report)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_pool.py"],
                            capture_output=True, text=True, cwd=run, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not pathlib.Path(report.read_text()).exists()

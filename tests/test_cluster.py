"""The README's cluster recipes, run for real: Ray on a local cluster of 2 CPUs and Spark in ``local[2]`` mode.

Each recipe is taken from the README as written (its ``# recipe: NAME`` block), with only its settings line pointed
at a small folder, a tiny model and a temporary output, and ``ray.init()`` given the local cluster's size; its
output must equal an unsharded ``clip embed`` run: the same rows, the same arrays. The engines are test extras
(``pip install '.[test]'``); where one is missing, or Spark finds no Java, its tests are skipped.
"""
import os
import pathlib
import re
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from checkpoints import TINY_VIT, random_state_dict, save_state_dict
from clip._cli import main
from clip._outputs import read_rows

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = re.compile(r"^IMAGES, OUTPUT, MODEL, (SHARDS|WORKERS|PARTITIONS) = .*$", re.M)


def recipe(name: str) -> str:
    """The README's python block that starts with ``# recipe: NAME``."""
    blocks = re.findall(r"```python\n(# recipe: [\w-]+\n.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [block for block in blocks if block.startswith(f"# recipe: {name}\n")]
    assert len(found) == 1, f"README has no single '# recipe: {name}' block"
    return found[0]


def run_recipe(name: str, setup: dict, output, count: int, **replace: str) -> None:
    """Run a README recipe on the test's folder, model and output; ``replace`` maps README text to the test's."""
    code = recipe(name)
    kind = SETTINGS.search(code).group(1)
    code = SETTINGS.sub(f"IMAGES, OUTPUT, MODEL, {kind} = {str(setup['folder'])!r}, {str(output)!r}, "
                        f"{str(setup['model'])!r}, {count}", code)
    code = code.replace('"/shared/clip-cache"', repr(str(pathlib.Path(output).parent / "cache")))
    for old, new in replace.items():
        assert old in code, f"recipe {name} no longer holds {old!r}"
        code = code.replace(old, new)
    exec(compile(code, f"README.md:{name}", "exec"), {"__name__": f"recipe_{name.replace('-', '_')}"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, a folder of 7 images in nested folders, and the unsharded `clip embed` output for it."""
    root = tmp_path_factory.mktemp("cluster")
    model = save_state_dict(root / "tiny.pt", random_state_dict(TINY_VIT))
    folder = root / "images"
    colours = ["red", "green", "blue", "white", "black", "yellow", "purple"]
    for i, colour in enumerate(colours):
        path = folder / ("sub" if i % 2 else "") / f"{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 7 * i, 30 + 5 * i), colour).save(path)
    whole = root / "whole.npy"
    assert main(["embed", str(folder), "-o", str(whole), "--model", str(model), "--device", "cpu", "-q",
                 "--batch-size", "64", "--num-workers", "0"]) == 0
    # The workers run the `clip` command and import `clip`: this interpreter's, and this checkout.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {"model": model, "folder": folder, "whole": whole, "rows": read_rows(str(root / "whole.txt"))}


def check_equal_to_unsharded(setup, output) -> None:
    """The same rows in the same order, and the same features up to float32 rounding: the engines' workers run
    torch with other thread counts (Ray gives each task one) and other batches, which changes the order of the
    sums (differences of a few 1e-8 were seen; 1e-6 is far below any difference between two images)."""
    output = pathlib.Path(output)
    assert read_rows(str(output.with_suffix(".txt"))) == setup["rows"]
    np.testing.assert_allclose(np.load(output), np.load(setup["whole"]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ray_cluster(setup):
    ray = pytest.importorskip("ray")
    # A socket's path holds at most 107 bytes. Ray keeps its sockets in its temporary folder, and its workers'
    # DataLoader workers pass tensors through sockets in TMPDIR, so under a long TMPDIR (macOS's is about 49
    # characters, and the run's own folder adds 20) neither works: both get a short folder of their own in /tmp.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             runtime_env={"env_vars": {"TMPDIR": temp}})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def spark(setup):
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java (17 or newer) on PATH")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    yield session
    session.stop()


# Each test names the README text it replaces: ray.init() joins the local cluster the fixture started, and a task
# asks for a CPU where the recipe asks for a GPU.
RAY_INIT = {"ray.init()": "ray.init(ignore_reinit_error=True)"}


def test_ray_shards_then_merge(ray_cluster, setup, tmp_path):
    run_recipe("ray-shards", setup, tmp_path / "features.npy", 2, **RAY_INIT, **{"num_gpus=1": "num_cpus=1"})
    check_equal_to_unsharded(setup, tmp_path / "features.npy")


def test_ray_data_loads_the_model_once_per_worker(ray_cluster, setup, tmp_path):
    run_recipe("ray-data", setup, tmp_path / "features.npy", 2, **RAY_INIT)
    check_equal_to_unsharded(setup, tmp_path / "features.npy")


def test_spark_shards_then_merge(spark, setup, tmp_path):
    run_recipe("spark-shards", setup, tmp_path / "features.npy", 2)
    check_equal_to_unsharded(setup, tmp_path / "features.npy")


def test_spark_partitions_load_the_model_once_per_partition(spark, setup, tmp_path):
    run_recipe("spark-partitions", setup, tmp_path / "features.npy", 2)
    check_equal_to_unsharded(setup, tmp_path / "features.npy")

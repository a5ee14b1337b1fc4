"""Embedding jobs that cannot merge the wrong rows: the record each output carries, one writer per output, the
checks of what will be written before any work, and one line (or silence, on a closed pipe) for every ending.

Each case runs ``clip`` as a user would, on a tiny random ViT and a few tiny images, in seconds.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import clip.clip
from clip._cli import main
from checkpoints import TINY_VIT, random_state_dict, save_state_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "cyan", "magenta", "orange", "purple", "pink", "grey"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_state_dict(tmp_path_factory.mktemp("model") / "tiny.pt", random_state_dict(TINY_VIT))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> str:
    """Another model of the same width: its shards fit beside the first's, and must not be merged with them."""
    return save_state_dict(tmp_path_factory.mktemp("other") / "tiny.pt", random_state_dict(TINY_VIT, seed=1))


def _images(folder: pathlib.Path, colours) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for colour in colours:
        Image.new("RGB", (24, 20), colour).save(folder / f"{colour}.png")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def embed(capsys, model, source, output, *extra):
    return run(capsys, "embed", source, "-o", output, "-m", model, "--device", "cpu", "--batch-size", "3",
               "--num-workers", "0", "-q", *extra)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _clip(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clip", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=300, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# 1. A shard knows what it was cut from


def test_images_added_before_a_resubmission_merge_exactly_one_run_of_the_new_folder(capsys, checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:8])
    output = tmp_path / "job" / "f.npy"
    for index in (0, 1):  # the job stopped after two of its four shards
        assert embed(capsys, checkpoint, photos, output, "--shard", f"{index}/4")[0] == 0
    _images(photos, COLOURS[8:])  # four images added
    errors = []
    for index in range(4):  # the whole job resubmitted
        code, _, err = embed(capsys, checkpoint, photos, output, "--shard", f"{index}/4")
        assert code == 0, err
        errors.append(err)
    for index in (0, 1):
        assert (f"clip: warning: shard {index}/4: {tmp_path / 'job' / f'f.shard-{index}-of-4.npy'} was made from "
                "other inputs, model or options (inputs: 8 images") in errors[index]
        assert "vs 12 images" in errors[index] and ": recomputing it" in errors[index]
    assert all("warning" not in err for err in errors[2:])
    code, _, err = run(capsys, "merge", output)
    assert code == 0 and err == f"4 shards, 12 rows merged into {output} and {output.with_suffix('.txt')}\n"

    whole = tmp_path / "whole" / "f.npy"
    assert embed(capsys, checkpoint, photos, whole)[0] == 0
    assert output.with_suffix(".txt").read_text() == whole.with_suffix(".txt").read_text()
    np.testing.assert_array_equal(np.load(output), np.load(whole))
    # The merged output's record is the one the unsharded run wrote: a rerun into either knows it for its own.
    assert json.loads(output.with_suffix(".json").read_text()) == json.loads(whole.with_suffix(".json").read_text())
    code, _, err = embed(capsys, checkpoint, photos, output)
    assert code == 0 and "already exists, made from the same inputs, model and options; skipping" in err


def test_merge_refuses_shards_of_two_models_naming_the_shards_and_the_difference(capsys, checkpoint,
                                                                                   other_checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:4])
    output = tmp_path / "f.npy"
    assert embed(capsys, checkpoint, photos, output, "--shard", "0/2")[0] == 0
    assert embed(capsys, other_checkpoint, photos, output, "--shard", "1/2")[0] == 0
    code, _, err = run(capsys, "merge", output)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: shards 0 and 1 of {tmp_path / 'f'}.npy were not cut from the same job "
                          "(checkpoint: tiny.pt (sha256:")
    assert not output.exists()


def test_merge_refuses_shards_of_two_listings_or_options(capsys, checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:4])
    output = tmp_path / "f.npy"
    assert embed(capsys, checkpoint, photos, output, "--shard", "0/2")[0] == 0
    _images(photos, COLOURS[4:6])
    code, _, err = embed(capsys, checkpoint, photos, output, "--shard", "1/2", "--precision", "bf16",
                         "--force-precision")
    assert code == 0, err
    code, _, err = run(capsys, "merge", output)
    assert code == 1 and err.count("\n") == 1 and "shards 0 and 1" in err
    assert "inputs: 4 images (listing sha256 " in err and "vs 6 images" in err
    assert "options: --precision fp32 vs --precision bf16" in err


def test_keep_existing_refuses_to_replace_an_output_of_another_job_in_one_line(capsys, checkpoint, tmp_path,
                                                                                 monkeypatch):
    photos = _images(tmp_path / "photos", COLOURS[:3])
    output = tmp_path / "f.npy"
    assert embed(capsys, checkpoint, photos, output)[0] == 0
    before = output.read_bytes()
    _images(photos, COLOURS[3:4])
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, _, err = embed(capsys, checkpoint, photos, output, "--keep-existing")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: {output} was made from other inputs, model or options (inputs: 3 images")
    assert "--keep-existing keeps it" in err and output.read_bytes() == before
    code, _, err = run(capsys, "embed", photos, "-o", output, "--overwrite", "--keep-existing")
    assert code == 2 and "not allowed with argument" in err


def test_an_unsharded_rerun_with_another_model_or_option_recomputes_and_says_why(capsys, checkpoint,
                                                                                 other_checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:3])
    output = tmp_path / "f.npy"
    assert embed(capsys, checkpoint, photos, output)[0] == 0
    first = np.load(output)
    code, _, err = embed(capsys, other_checkpoint, photos, output)
    assert code == 0 and "was made from other inputs, model or options (checkpoint: tiny.pt" in err
    assert "recomputing it" in err and not np.array_equal(np.load(output), first)


def test_outputs_without_a_record_are_not_taken_for_a_finished_run(capsys, checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:2])
    np.save(tmp_path / "f.npy", np.zeros((2, TINY_VIT.embed_dim), np.float32))
    (tmp_path / "f.txt").write_text("mine\nalso mine\n")
    code, _, err = embed(capsys, checkpoint, photos, tmp_path / "f.npy")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: {tmp_path / 'f.npy'} and {tmp_path / 'f.txt'} exist but without the record")
    assert (tmp_path / "f.txt").read_text() == "mine\nalso mine\n"
    (tmp_path / "f.json").write_text('{"mine": true}\n')  # a JSON file of the user's is not a record either
    code, _, err = embed(capsys, checkpoint, photos, tmp_path / "f.npy")
    assert code == 1 and f"{tmp_path / 'f.json'} holds no record" in err
    assert (tmp_path / "f.json").read_text() == '{"mine": true}\n'


def test_the_record_of_a_text_file_counts_its_texts_and_a_byte_order_mark_is_not_text(capsys, checkpoint, tmp_path):
    source = tmp_path / "captions.txt"
    source.write_bytes("\ufeffa photo of a dog\r\na cat\r\n".encode("utf-8"))  # as Windows Notepad saves it
    assert embed(capsys, checkpoint, source, tmp_path / "t.npy")[0] == 0
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "a photo of a dog\na cat\n"
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["inputs"]["kind"] == "texts" and record["inputs"]["count"] == 2
    plain = tmp_path / "plain.txt"
    plain.write_text("a photo of a dog\na cat\n")
    assert embed(capsys, checkpoint, plain, tmp_path / "p.npy")[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), np.load(tmp_path / "p.npy"))
    assert json.loads((tmp_path / "p.json").read_text())["inputs"] == record["inputs"]


def test_the_row_options_are_listed_in_one_place():
    from clip import _cli, _outputs

    embed_options = vars(_cli.build_parser().parse_args(["embed", "in", "-o", "out.npy"]))
    assert set(_outputs.ROW_OPTIONS) <= set(embed_options) and "precision" in _outputs.ROW_OPTIONS


# ----------------------------------------------------------------------------------------------------------------
# 2. One writer per output


HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from clip import _outputs\n"
        "with _outputs.writing(sys.argv[1]):\n"
        "    open(sys.argv[1] + '.0123456789ab.tmp', 'w').write('half written')\n"
        "    print('held', flush=True); time.sleep(120)\n")


def test_a_second_run_into_a_held_output_says_who_holds_it_and_leaves_its_files(checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", COLOURS[:2])
    output = tmp_path / "f.npy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = _clip("embed", photos, "-o", output, "-m", checkpoint, "--device", "cpu", "-q")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr == (f"clip: error: another run (process {holder.pid}) is writing {tmp_path / 'f'}.npy: "
                                 "wait for it to finish, or choose another --output\n")
        # The live run's temporary file is not "stale": only the run holding the lock cleans up.
        assert (tmp_path / "f.npy.0123456789ab.tmp").exists() and not output.exists()
        result = _clip("merge", output)
        assert result.returncode == 1 and "another run (process" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    # A killed holder releases the output at once; the next run cleans up what it left, and writes.
    result = _clip("embed", photos, "-o", output, "-m", checkpoint, "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["f.json", "f.npy", "f.txt", "photos"]


def test_two_concurrent_runs_into_one_output_end_with_a_consistent_pair_or_a_clear_refusal(checkpoint, tmp_path):
    texts = tmp_path / "a.txt"
    texts.write_text("".join(f"caption {n}\n" for n in range(300)))
    other = tmp_path / "b.txt"
    other.write_text("".join(f"another {n}\n" for n in range(7)))
    output = tmp_path / "out.npy"
    runs = [subprocess.Popen([sys.executable, "-m", "clip", "embed", source, "-o", output, "-m", checkpoint,
                              "--device", "cpu", "-q", "--overwrite"], cwd=REPO, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for source in (texts, other)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in runs]
    for code, err in results:
        assert code == 0 or (code == 1 and err.startswith("clip: error: another run (process ")), err
    assert any(code == 0 for code, _ in results)
    rows = (tmp_path / "out.txt").read_text().splitlines()
    assert len(rows) == len(np.load(output)) and rows in ([f"caption {n}" for n in range(300)],
                                                          [f"another {n}" for n in range(7)])
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["inputs"]["count"] == len(rows)
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".lock"))]


# ----------------------------------------------------------------------------------------------------------------
# 3. Checks before any work of what will be written


def _name_max(folder: pathlib.Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def test_a_long_output_name_is_refused_before_any_work_or_works(capsys, checkpoint, tmp_path, monkeypatch):
    photos = _images(tmp_path / "photos", COLOURS[:2])
    limit = _name_max(tmp_path)
    real_load = clip.clip.load
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    name = "x" * (250 - len(".npy")) + ".npy"  # 250 bytes: the file fits, its temporary names do not
    assert len(name) <= limit
    code, _, err = embed(capsys, checkpoint, photos, tmp_path / name)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: the output name {name} is too long for its file system once the run's own "
                          f"suffixes are added (its longest file is named like {'x' * 246}.json.")
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    # The longest name that fits: its record's temporary name, OUT.json.<12 hex>.tmp, is exactly the limit.
    stem = "y" * (limit - len(".json") - len(".0123456789ab.tmp"))
    monkeypatch.setattr(clip.clip, "load", real_load)
    code, _, err = embed(capsys, checkpoint, photos, tmp_path / f"{stem}.npy")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(["photos", f"{stem}.json", f"{stem}.npy", f"{stem}.txt"])


@pytest.mark.parametrize("output", ["res/", "res" + os.sep, ".npy", "res/.npy"])
def test_an_output_that_names_no_file_is_an_error(capsys, checkpoint, tmp_path, output, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = _images(tmp_path / "photos", COLOURS[:1])
    code, _, err = embed(capsys, checkpoint, photos, output)
    assert code == 1 and err.startswith(f"clip: error: --output {output} names no file; name a .npy file, e.g. ")
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    code, _, err = run(capsys, "merge", output)
    assert code == 1 and "names no file" in err


def test_a_huge_shard_count_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "embed", tmp_path, "-o", tmp_path / "f.npy", "--shard", "0/1000000000000")
    assert code == 2 and "N is at most 1000000" in err


def test_merge_of_shard_names_claiming_a_huge_count_is_one_line_at_once(capsys, tmp_path):
    np.save(tmp_path / "m.shard-0-of-1000000000000.npy", np.ones((1, 4), np.float32))
    start = time.monotonic()
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 1 and err.count("\n") == 1 and "names 1000000000000 shards" in err
    np.save(tmp_path / "n.shard-0-of-900000.npy", np.ones((1, 4), np.float32))
    code, _, err = run(capsys, "merge", tmp_path / "n.npy")
    assert code == 1 and err == ("clip: error: 899999 of 900000 shards are missing (I = 1, 2, 3, 4, 5, 6, 7, 8, 9, "
                                 "10, ...): run clip embed with those --shard values first\n")
    assert time.monotonic() - start < 30


def test_a_fifo_as_a_text_input_or_labels_file_is_one_line_not_a_hang(checkpoint, tmp_path):
    fifo = tmp_path / "texts.txt"
    os.mkfifo(fifo)
    image = _images(tmp_path / "photos", COLOURS[:1]) / "red.png"
    for argv in (["embed", fifo, "-o", tmp_path / "f.npy", "-m", checkpoint],
                 ["classify", image, "--labels-file", fifo, "-m", checkpoint]):
        result = _clip(*argv)  # a hang would be a TimeoutExpired, failing the test
        assert result.returncode in (1, 2) and result.stderr.count("\n") == 1, result.stderr
        assert "not a regular file" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# 4. One line, always; nothing on a closed pipe


def _closed_pipe_run(*argv):
    """``clip ARGV`` writing into a pipe whose reader has gone (as ``| head -1`` leaves it, made certain)."""
    reader, writer = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "clip", *map(str, argv)], cwd=REPO, env=_env(),
                               stdout=writer, stderr=subprocess.PIPE, text=True)
    os.close(writer)
    os.close(reader)  # before the command has written anything: every write it makes meets a closed pipe
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_a_closed_pipe_ends_every_printing_command_quietly(checkpoint, tmp_path):
    image = _images(tmp_path / "photos", COLOURS[:1]) / "red.png"
    for argv in (["models", "--download-root", tmp_path],
                 ["classify", image, "--labels", "a", "b", "-m", checkpoint, "--device", "cpu"],
                 ["classify", image, "--labels", "a", "-m", checkpoint, "--device", "cpu", "--json"]):
        code, err = _closed_pipe_run(*argv)
        assert (code, err) == (141, ""), argv  # 128 + SIGPIPE, as the shell reports a command a closed pipe ended
    assert _closed_pipe_run("--help") == (0, "")  # argparse's own printing ignores a closed pipe


def test_the_shell_sees_a_closed_pipe_as_head_leaves_it(tmp_path):
    if shutil.which("sh") is None or shutil.which("head") is None:
        pytest.skip("needs a shell and head")
    command = f"{sys.executable} -m clip models --download-root {tmp_path} | head -1"
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("NAME") and result.stderr == ""


def test_an_error_of_several_lines_is_one_line():
    from clip import _cli

    assert _cli.error_line("could not download x\n  tried: a\n  use --model PATH\x1b") == \
        "could not download x tried: a use --model PATH\\x1b"


def test_the_unsafe_character_rule_is_one_for_the_package_and_the_launcher():
    import clip_dropin_launcher
    from clip import _console

    assert _console.printable is clip_dropin_launcher.printable
    assert _console.UNSAFE_CHARACTERS is clip_dropin_launcher.UNSAFE_CHARACTERS
    assert clip_dropin_launcher.printable("a\nb\x1b\u2028") == "a\\x0ab\\x1b\\u2028"
    assert clip_dropin_launcher.printable("a\nb", keep_newlines=True) == "a\nb"


def test_a_difference_in_options_names_only_the_options_that_differ():
    from clip import _outputs

    old = {"options": {"precision": "fp32", "fast_decode": False, "auto_orient": False}}
    new = {"options": {"precision": "fp32", "fast_decode": True, "auto_orient": False}}
    assert _outputs.differences(old, new) == ["options: --fast-decode False vs --fast-decode True"]
    assert {"fast_decode", "auto_orient"} <= set(_outputs.ROW_OPTIONS)


def test_a_run_whose_output_lock_was_taken_over_writes_nothing_and_says_so(tmp_path, monkeypatch):
    """A run stopped past the stale bound, whose lock another host's run cleared and took, must not write."""
    import threading

    import numpy as np
    from clip import _outputs
    from clip._console import CLIError

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    monkeypatch.setattr(_outputs, "HEARTBEAT", 0.05)
    features, rows = tmp_path / "out.npy", tmp_path / "out.txt"
    with _outputs.writing(str(features)):
        lock = tmp_path / "out.lock"
        lock.unlink()
        lock.write_text("12345 another-host\n")  # the other run's marker, made after ours was cleared
        time.sleep(0.3)  # heartbeats meet the lost lock
        with pytest.raises(CLIError, match="took .*out.lock over"):
            _outputs.save_outputs(str(features), str(rows), np.zeros((1, 4), np.float32), ["a"], {"format": "x"})
    assert errors == [] and sorted(os.listdir(tmp_path)) == ["out.lock"]  # nothing written, the other's marker kept


def test_merge_refuses_a_shard_rewritten_while_it_reads_it(tmp_path, monkeypatch):
    import json

    from clip import _outputs
    from clip._console import CLIError

    stem = tmp_path / "f"
    for index in range(2):
        record = {"format": _outputs.RECORD_FORMAT, "model": "m.pt", "checkpoint": "sha256:" + "0" * 64,
                  "inputs": {"kind": "texts", "count": 2, "sha256": "ab" * 32}, "shard": f"{index}/2",
                  "options": {"precision": "fp32"}, "computed": "float32 on cpu"}
        features_path, list_path = _outputs.output_paths(str(stem) + ".npy", (index, 2))
        _outputs.save_outputs(features_path, list_path, np.full((1, 4), index, np.float32), [f"t{index}"], record)
    real = _outputs._load_features

    def rewritten_meanwhile(path):  # another run rewrites shard 1 (another model) just as merge reads it
        loaded = real(path)
        if ".shard-1-" in path:
            record_file = _outputs.record_path(path)
            record = json.loads(open(record_file).read())
            record["checkpoint"] = "sha256:" + "1" * 64
            open(record_file, "w").write(json.dumps(record))
        return loaded

    monkeypatch.setattr(_outputs, "_load_features", rewritten_meanwhile)
    with pytest.raises(CLIError, match="changed while it was merged"):
        _outputs.merge(str(stem) + ".npy")
    assert not (tmp_path / "f.npy").exists()


def test_the_measured_split_takes_no_more_cores_than_the_run_was_given(monkeypatch):
    import torch
    from clip import _embed

    monkeypatch.setattr(_embed, "available_cores", lambda: 64)
    seen = []
    real = _embed.split_cores
    monkeypatch.setattr(_embed, "split_cores", lambda d, m, cores: seen.append(cores) or real(d, m, cores))
    threads = torch.get_num_threads()
    paths = [os.path.join(os.path.dirname(__file__), "data", "images", name)
             for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "data", "images")))
             if name.lower().endswith((".png", ".jpg", ".jpeg"))][:3]
    import clip.clip

    batches = list(_embed.image_batches(paths * 4, clip.clip._transform(32), 2, 0, balance=True))
    assert sum(len(indices) for indices, _, _ in batches) == len(paths) * 4
    assert seen == [min(64, threads + 0)] and _embed.split_cores(0.05, 0.01, 64)[0] > _embed.MAX_WORKERS

"""Faults and bad input: every file read, every path written, every signal ends in one line, never a traceback,
and leaves nothing half-done behind."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from clcli import train as train_lib
from clcli.cli import main
from clcli.data import QUICKSTART_DIR

from _helpers import tiny_args, tiny_recipe


def _main(args, capsys) -> tuple[int, str, str]:
    """clcli's entry point in this process: (exit code, stdout, stderr)."""
    saved = sys.argv
    sys.argv = ["clcli", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *phrases):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def _cli(args, env=None, drop=()):
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "clcli", *map(str, args)], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=600)


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_mode) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 1-epoch CL run of two tiny networks."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train_lib.train(tiny_recipe(epochs=1), out, show_progress=False)
    return out


def _image(folder):
    from PIL import Image

    path = folder / "image.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path


def _copy(run, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


# --- 1. every text file the tool reads --------------------------------------------------------------------------


def test_unreadable_recipe_and_plan_files_are_one_line_errors(tmp_path, capsys):
    binary = tmp_path / "random.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    empty, listed = tmp_path / "empty.yaml", tmp_path / "list.yaml"
    empty.write_text("")
    listed.write_text("- a\n- b\n")
    plan = tmp_path / "plan.json"
    plan.write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "never"
    for args, phrases in [
        (["train", "--recipe", binary, "--out", out], ["not UTF-8 text"]),
        (["recipes", "show", binary], ["not UTF-8 text"]),
        (["train", "--recipe", empty, "--out", out], ["is empty"]),
        (["recipes", "show", empty], ["is empty"]),
        (["recipes", "show", listed], ["must be a mapping"]),
        (["recipes", "show", tmp_path], ["is a folder"]),
        ([*tiny_args(out, epochs=1), "--plan", plan], ["plan file", "not UTF-8 text"]),
        ([*tiny_args(out, epochs=1), "--plan", tmp_path / "nope.json"], ["plan file not found"]),
    ]:
        code, _, err = _main(args, capsys)
        _assert_one_line_error(code, err, *phrases)
    assert not out.exists()


def test_damaged_run_folder_files_on_resume_are_one_line_errors(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    info = (run / "run.json").read_text()
    recipe = (run / "recipe.yaml").read_text()
    for name, content, phrases in [
        ("run.json", b"\x80\x81\x82 not text", ["run.json", "not UTF-8 text"]),
        ("run.json", b"[1, 2]", ["run.json", "must hold a mapping"]),
        ("run.json", b"{\"method\": ", ["run.json", "not valid JSON"]),
        ("run.json", b"{\"format\": 1}", ["not a clcli run.json"]),
        ("run.json", json.dumps({**json.loads(info), "models": 5}).encode(), ["'models' must be a list of model"]),
        ("run.json", json.dumps({**json.loads(info), "mean": "a"}).encode(), ["'mean' must be a list of numbers"]),
        ("recipe.yaml", b"\xff\xfe\xfa", ["recipe.yaml", "not UTF-8 text"]),
        ("recipe.yaml", b"models: [a\n", ["recipe.yaml", "not valid YAML"]),
        ("recipe.yaml", b"", ["recipe.yaml", "must hold a mapping"]),
        ("plan.json", b"\xc3\x28", ["plan.json", "not UTF-8 text"]),
    ]:
        (run / "run.json").write_text(info.replace('"finished"', '"running"'))
        (run / "recipe.yaml").write_text(recipe)
        (run / name).write_bytes(content)
        before = _snapshot(run)
        for args in (["train", "--resume", run, "--no-progress"], ["export", run, "--out", tmp_path / "x"]):
            code, _, err = _main(args, capsys)
            _assert_one_line_error(code, err, *phrases)
        assert _snapshot(run) == before and not (tmp_path / "x").exists()


def test_a_damaged_export_manifest_is_a_one_line_error(trained_run, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = _main(["export", trained_run, "--out", out, "--no-measure"], capsys)
    _assert_one_line_error(code, err, "export manifest", "not UTF-8 text", "move it away")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


# --- 1. every path the tool writes ------------------------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(trained_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = [
        (["export", trained_run, "--out", a_file], ["is a file, not a folder"]),
        (["export", trained_run, "--out", a_file / "below"], ["is a file, not a folder"]),
        (["export", trained_run, "--out", "/proc/clcli-export"], ["cannot write in /proc"]),
        ([*tiny_args(a_file, epochs=1)], ["is a file, not a folder"]),
        ([*tiny_args(a_file / "below", epochs=1)], ["is a file, not a folder"]),
        (["compare", "--out", a_file / "r", "--methods", "il", "--seeds", "1", "--no-progress"],
         ["report folder", "is a file"]),
    ]
    for args, phrases in cases:
        started = time.perf_counter()
        code, _, err = _main(args, capsys)
        _assert_one_line_error(code, err, *phrases)
        assert time.perf_counter() - started < 60  # refused before loading data or measuring anything
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    exported = tmp_path / "exported"
    (exported / "test_resnet.safetensors").mkdir(parents=True)  # a folder where a file goes
    code, _, err = _main(["export", trained_run, "--out", exported, "--no-measure"], capsys)
    _assert_one_line_error(code, err, "is a folder")
    assert sorted(p.name for p in exported.iterdir()) == ["test_resnet.safetensors"]


def test_run_files_and_exports_follow_the_umask(trained_run, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        code, _, err = _main(["export", trained_run, "--out", tmp_path / "e", "--no-measure", "--plain"], capsys)
        assert code == 0, err
        from clcli import files

        files.write_json(tmp_path / "w.json", {})
    finally:
        os.umask(previous)
    for path in [*(tmp_path / "e").iterdir(), tmp_path / "w.json"]:
        assert path.stat().st_mode & 0o777 == 0o640, path
    for path in trained_run.iterdir():  # written under pytest's umask, like metrics.jsonl (opened plainly)
        assert path.stat().st_mode & 0o777 == (trained_run / "metrics.jsonl").stat().st_mode & 0o777, path


# --- 2. non-finite weights --------------------------------------------------------------------------------------


def test_a_scalar_bound_at_inf_is_not_a_diverged_weight():
    # gemma4_vit registers clamp bounds as scalar buffers set to -inf and inf: its checkpoints were refused.
    from clcli import models

    inf = float("inf")
    state = {"q.input_min": torch.tensor(-inf), "q.input_max": torch.tensor(inf), "w": torch.ones(3)}
    assert models.non_finite(state) == (0, [])
    state.update({"b": torch.tensor([1.0, inf]), "s": torch.tensor(float("nan"))})
    assert models.non_finite(state) == (2, ["b", "s"])


def test_a_checkpoint_with_non_finite_buffers_is_never_written(tmp_path, monkeypatch):
    from clcli.errors import ClcliError
    from clcli.train import _evaluation

    real, calls = _evaluation.evaluate, []

    def evaluate_then_poison(net, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 2 (two networks): a BatchNorm running_var overflowed, the loss did not
            next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
        return real(net, *args, **kwargs)

    monkeypatch.setattr(_evaluation, "evaluate", evaluate_then_poison)
    out = tmp_path / "run"
    with pytest.raises(ClcliError, match=r"after epoch 2, .*NaN or inf.*the checkpoint of epoch 1 is kept"):
        train_lib.train(tiny_recipe(epochs=2), out, show_progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["method"].values()
                                       if v.is_floating_point())
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_export_eval_and_predict_refuse_non_finite_weights(trained_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    code, _, err = _main(["export", trained_run, "--out", tmp_path / "good", "--no-measure"], capsys)
    assert code == 0, err
    good = tmp_path / "good" / "test_resnet.safetensors"
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("running_var"))
    tensors[key][0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    image = _image(tmp_path)
    for args in (["eval", bad], ["predict", bad, image]):
        code, out, err = _main(args, capsys)
        _assert_one_line_error(code, err, "NaN or inf", key)
        assert "nan" not in out.lower()

    run = _copy(trained_run, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    name = next(k for k in state["method"] if k.endswith("running_var"))
    state["method"][name].fill_(float("inf"))
    torch.save(state, run / "checkpoint.pt")
    code, _, err = _main(["export", run, "--out", tmp_path / "never"], capsys)
    _assert_one_line_error(code, err, "NaN or inf", "checkpoint")
    assert not (tmp_path / "never").exists()


def test_predict_reports_a_non_finite_output_instead_of_a_nan_probability(trained_run, tmp_path):
    from clcli.export import export_run
    from clcli.predict import load_classifier, predict

    export_run(trained_run, tmp_path / "e", measure=False)
    classifier = load_classifier(tmp_path / "e" / "test_resnet.safetensors")
    classifier.preprocess = lambda image: torch.full((3, 32, 32), float("inf"))
    image = _image(tmp_path)
    [result] = predict(classifier, [image])
    assert "top" not in result and "not finite" in result["error"]


# --- 3. signals and leftovers -----------------------------------------------------------------------------------


def test_sigterm_marks_the_run_interrupted_and_says_how_to_continue(tmp_path):
    out = tmp_path / "run"
    # 256 images / batch 32 = 8 steps an epoch: stop in the middle of the second epoch
    stopped = _cli(tiny_args(out), env={"CLCLI_FAULT_KILL_AT_STEP": "11", "CLCLI_FAULT_SIGNAL": "TERM"})
    assert stopped.returncode == 143, stopped.stderr
    assert "Traceback" not in stopped.stderr and len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr
    assert f"interrupted at epoch 2 step 4 of 8 (SIGTERM); continue with `clcli train --resume {out}`" \
        in stopped.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["processes"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    info["processes"] = 2  # as if started under torchrun with two processes
    (out / "run.json").write_text(json.dumps(info))
    # the resumed run restarts at step 9 (epoch 2); stop it again at step 10
    resumed = _cli(["train", "--resume", out, "--no-progress"],
                   env={"CLCLI_FAULT_KILL_AT_STEP": "9", "CLCLI_FAULT_SIGNAL": "TERM"})
    assert resumed.returncode == 143, resumed.stderr
    assert "trained with 2 processes and resumes with 1" in resumed.stdout and "not be bit-exact" in resumed.stdout
    assert "interrupted at epoch 2 step 2 of 8 (SIGTERM)" in resumed.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_resuming_a_finished_run_says_it_is_finished(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    before = _snapshot(run)
    code, out, err = _main(["train", "--resume", run, "--no-progress"], capsys)
    assert code == 0, err
    assert "is finished" in " ".join(out.split()) and _snapshot(run) == before


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    stopped = _cli(tiny_args(out), env={"CLCLI_FAULT_KILL_AT_STEP": "2", "CLCLI_FAULT_SIGNAL": "INT"})
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr and len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr
    assert "interrupted at epoch 1 step 3 of 8 (SIGINT); no checkpoint had been written" in stopped.stderr
    assert not out.exists()


def test_a_run_that_fails_before_its_first_checkpoint_is_removed_and_export_picks_a_run_with_one(
        trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_run, tmp_path / "runs" / "good")
    failed = tmp_path / "runs" / "failed"
    code, _, err = _main([*tiny_args(failed, epochs=1), "--set", "train.lr=100"], capsys)
    _assert_one_line_error(code, err, "non-finite loss", "no checkpoint was written")
    assert not failed.exists()
    left = tmp_path / "runs" / "left"  # left by an older clcli or by SIGKILL: run.json, no checkpoint
    left.mkdir()
    (left / "run.json").write_text((trained_run / "run.json").read_text())
    code, out, err = _main(["export", "--out", tmp_path / "exported", "--no-measure"], capsys)
    assert code == 0, err
    assert "exporting runs/good, the newest run with a checkpoint" in " ".join(out.split())


# --- 4. offline and the Hub -------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_what_needs_the_hub_fails_at_once_without_a_network(tmp_path, network):
    env = {"HF_HUB_OFFLINE": "1"} if network == "offline" else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    drop = () if network == "offline" else ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    common = ["--epochs", "1", "--no-progress", "--set", "data.train_limit=32", "--set", "data.test_limit=16"]
    for args, phrases in [
        (["train", "--pretrained", "--models", "test_resnet", "test_efficientnet", "--data", QUICKSTART_DIR,
          "--set", "input_size=32", "--out", tmp_path / "p", *common],
         ["'test_resnet'", "Hugging Face Hub", "cannot be reached", "--weights test_resnet=FILE"]),
        (["train", "--recipe", "cifar10", "--out", tmp_path / "d", *common],
         ["dataset 'uoft-cs/cifar10'", "Hugging Face Hub", "cannot be reached", "--data FOLDER"]),
    ]:
        done = _cli(args, env=env, drop=drop)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        for phrase in phrases:
            assert phrase in done.stderr, (phrase, done.stderr)
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_error_lines_keep_whole_sentences():
    from clcli.errors import one_line

    long = "first sentence is here. " + "x" * 400 + ". last one"
    assert one_line(ValueError(long)) == "ValueError: first sentence is here"
    assert one_line(ValueError("a" * 500)).endswith("a" * 500)  # one long sentence is never cut


def test_a_truncated_checkpoint_is_quoted_whole(tmp_path):
    from clcli.errors import ClcliError
    from clcli import run as run_folder

    path = tmp_path / "checkpoint.pt"
    torch.save({"method": {"w": torch.randn(256, 64)}, "epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(Exception) as original:
        torch.load(path, weights_only=True)
    with pytest.raises(ClcliError) as quoted:
        run_folder.load_checkpoint(path)
    first_line = str(original.value).strip().splitlines()[0].strip()
    assert first_line in str(quoted.value) and "\n" not in str(quoted.value)


# --- more of the same kind --------------------------------------------------------------------------------------


def test_sighup_is_an_interruption_like_sigint_and_sigterm():
    import signal

    from clcli.train._interrupt import Interrupted, interrupt_signals

    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(Interrupted) as stopped:
        with interrupt_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.exit_code == 129 and "(SIGHUP)" in stopped.value.message
    assert signal.getsignal(signal.SIGHUP) is before  # the previous handler is back


def test_other_output_paths_are_checked_before_any_work(trained_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for args, phrases in [
        (["probe", "test_resnet", "test_efficientnet", "--plot", a_file / "p.png"], ["plot", "is a file"]),
        (["report", trained_run, "--out", a_file / "r.png"], ["picture", "is a file"]),
        (["report", trained_run, "--out", tmp_path], ["picture", "is a folder"]),
    ]:
        code, _, err = _main(args, capsys)
        _assert_one_line_error(code, err, *phrases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and a_file.read_text() == "mine"


def test_an_unwritable_data_cache_is_named_before_decoding(tmp_path, monkeypatch):
    from clcli.data import load_image_tensors
    from clcli.errors import ClcliError

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    monkeypatch.setenv("CLCLI_CACHE", str(a_file / "cache"))
    with pytest.raises(ClcliError, match=r"cache folder \(CLCLI_CACHE\) .*a_file is a file, not a folder"):
        load_image_tensors(str(QUICKSTART_DIR), "train", limit=8)
    assert a_file.read_text() == "mine"


def test_a_torn_metrics_line_is_left_out(trained_run, tmp_path):
    from clcli.run import read_metrics

    run = _copy(trained_run, tmp_path)
    whole = read_metrics(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "ep')  # a crash in the middle of a line
    assert read_metrics(run) == whole and whole


def test_a_float_in_exponent_notation_is_a_number():
    from clcli import recipes

    recipe = recipes.load("quickstart", ["train.lr=1e-3", "cl.alpha=2E-1"])
    assert recipe.train.lr == 0.001 and recipe.cl.alpha == 0.2


def test_a_malformed_plan_file_names_the_file(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    out = tmp_path / "never"
    for content, phrase in [({}, "not a clcli plan"), ({"version": 1, "models": 3}, "malformed clcli plan")]:
        plan.write_text(json.dumps(content))
        code, _, err = _main([*tiny_args(out, epochs=1), "--plan", plan], capsys)
        _assert_one_line_error(code, err, f"plan file {plan}", phrase)
    assert not out.exists()


def test_sigterm_during_export_leaves_no_half_written_file(trained_run, tmp_path, monkeypatch, capsys):
    import signal

    from clcli import export

    real = export._tensors

    def tensors_then_terminated(state):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler stops the job while the first file is being written
        time.sleep(5)
        return real(state)

    monkeypatch.setattr(export, "_tensors", tensors_then_terminated)
    out = tmp_path / "exported"
    code, _, err = _main(["export", trained_run, "--out", out, "--no-measure"], capsys)
    assert code == 143 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "interrupted (SIGTERM)" in err and "run the same command again" in err
    assert not out.exists() or not any(out.iterdir())  # no temporary or partial file left


@pytest.mark.parametrize("command", ["eval", "predict", "compare"])
def test_ctrl_c_in_eval_predict_and_compares_el_measurement_is_one_line_and_130(command, tmp_path, monkeypatch,
                                                                                capsys):
    """Ctrl-C while a command works (inside evaluation, classification, or compare's EL measurement after its grid)
    is one line and exit code 130, as in training: not typer's "Aborted!" or a silent exit."""
    import signal

    from clcli import compare, export, predict

    def ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    if command == "compare":  # the grid's runs are there (reused); the EL measurement is interrupted
        monkeypatch.setattr(compare, "_ensure_run", lambda *args: "reused")
        monkeypatch.setattr(compare, "_read_run", lambda m, s, run_dir: compare.RunResult(m, s, run_dir, ["a"], [50.0]))
        monkeypatch.setattr(compare, "_ensemble", ctrl_c)
        args = ["compare", "--methods", "il,el", "--seeds", "1", "--out", tmp_path / "report", "--no-progress"]
        hint = "run the same `clcli compare` again to continue"
    else:
        monkeypatch.setattr(export, "evaluate_export", ctrl_c)
        monkeypatch.setattr(predict, "load_classifier", ctrl_c)
        args = [command, tmp_path / "net.safetensors"] + ([tmp_path] if command == "predict" else [])
        hint = "nothing was written: run the same command again"
    code, _, err = _main(args, capsys)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    assert f"interrupted (SIGINT); {hint}" in " ".join(err.split())


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The second epoch's checkpoint meets a full disk: its file takes 1 MiB, then every write fails with ENOSPC as a
    full filesystem's do (checked by hand on a 6 MB tmpfs too, docs/cli.md). One line naming the file and the space
    it needed, exit code 2, the first epoch's checkpoint and every earlier file as they were."""
    import errno
    import io

    from clcli import run as run_module

    class FullAfter(io.FileIO):
        room = 1 << 20

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return super().write(data)

    opened: list = []

    def open_checkpoint(file, mode="r", *args, **kwargs):
        if ".checkpoint.pt." in str(file):
            opened.append(file)
        if len(opened) == 2 and str(file) == str(opened[-1]):  # the second epoch's checkpoint
            return io.BufferedWriter(FullAfter(file, mode.replace("b", "")))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(run_module, "open", open_checkpoint, raising=False)  # save_checkpoint's open
    out = tmp_path / "run"
    args = [*tiny_args(out, epochs=2), "--set", "data.train_limit=64", "--set", "train.batch_size=16",
            "--set", "methods=[il]"]
    code, _, err = _main(args, capsys)
    _assert_one_line_error(code, err, f"no space left on the device for {out / 'checkpoint.pt'} (it needed about",
                           "MiB", "stopped after epoch 2: the checkpoint of epoch 1 is kept")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # whole, and the first epoch's
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "epoch"] == [0, 1]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "plan.json", "recipe.yaml",
                                                     "run.json"]


def test_one_image_per_batchnorm_forward_is_one_line_and_a_few_get_a_note(tmp_path, capsys):
    """train.batch_size 1 (or a batch that processes and micro-batches cut to one image) cannot train BatchNorm:
    torch stops inside the first forward with a 100-line traceback. 2 to 7 images train, with a note on clipping."""
    for sets in (["train.batch_size=1"], ["train.batch_size=4", "train.accumulate=4"]):
        out = tmp_path / "one"
        code, _, err = _main([*tiny_args(out, epochs=1), *[x for s in sets for x in ("--set", s)]], capsys)
        _assert_one_line_error(code, err, "gives BatchNorm one image per forward", "use at least 2 images",
                               "train.clip_grad")
        assert not out.exists()
    code, out, err = _main([*tiny_args(tmp_path / "two", epochs=1), "--set", "train.batch_size=2",
                            "--set", "data.train_limit=4", "--set", "data.test_limit=8"], capsys)
    assert code == 0, err
    assert "note: 2 images per forward" in " ".join(out.split()) and "train.clip_grad" in out


def test_a_full_disk_during_export_is_one_line_and_leaves_no_file(trained_run, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as a SafetensorError quoting the OS error (as on a full tmpfs: "I/O error:
    No space left on device (os error 28)"): one line naming the file, exit code 2, no file written."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a part written, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "exported"
    code, _, err = _main(["export", trained_run, "--out", out, "--no-measure"], capsys)
    _assert_one_line_error(code, err, "no space left on the device for", str(out))
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("error, epoch", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 92274688 bytes. Error code 12 (Cannot allocate memory)"), 2),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79 GiB"),
     1),
])
def test_out_of_memory_while_training_is_one_line_with_what_to_change(error, epoch, tmp_path, monkeypatch, capsys):
    """The zoo sweep found it: a 412M-parameter ViT at 1024 tokens ran out of memory in its first step, a traceback.
    Out of memory (the CPU allocator's RuntimeError, CUDA's OutOfMemoryError) is one line naming the batch size and
    the options that lower memory, saying what is kept; exit code 2."""
    from clcli.train import _evaluation

    real, calls = _evaluation.evaluate, []

    def evaluate_until_out_of_memory(net, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * (epoch - 1):  # two networks per evaluation
            raise error
        return real(net, *args, **kwargs)

    monkeypatch.setattr(_evaluation, "evaluate", evaluate_until_out_of_memory)
    out = tmp_path / "run"
    args = [*tiny_args(out, epochs=2), "--set", "data.train_limit=64", "--set", "train.batch_size=16",
            "--set", "methods=[il]"]
    code, _, err = _main(args, capsys)
    kept = f"the last checkpoint is kept in {out / 'checkpoint.pt'}" if epoch > 1 else "nothing was kept"
    _assert_one_line_error(code, err, "out of memory on cpu training", "at train.batch_size 16", kept,
                           "allocate", "train.accumulate", "train.grad_checkpointing")
    if epoch > 1:
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
        assert json.loads((out / "run.json").read_text())["status"] == "failed"
    else:
        assert not out.exists()


def test_a_run_another_process_trains_is_neither_resumed_nor_replaced(trained_run, tmp_path):
    """Two processes over one run folder (a second `clcli compare` over the same runs while the first still trains
    one) interleaved their checkpoints and metrics; now the second stops with one line and writes nothing."""
    from clcli import run as run_folder
    from clcli.errors import ClcliError

    out = tmp_path / "out"
    shutil.copytree(trained_run, out / "cl")
    with run_folder.held(out / "cl"):  # what training holds; a second open file description cannot take it
        before = _snapshot(out)
        with pytest.raises(ClcliError, match=rf"{out / 'cl'} is being trained by process {os.getpid()}"):
            with run_folder.held(out / "cl"):
                pass
        with pytest.raises(ClcliError, match="is being trained by process"):
            run_folder.prepare(out, resume=False, force=True)
        assert _snapshot(out) == before
    assert not (out / "cl" / run_folder.LOCK).exists()  # the lock file goes with the run
    run_folder.prepare(out, resume=False, force=True)  # no one holds it: --force replaces it
    assert not any(out.iterdir())

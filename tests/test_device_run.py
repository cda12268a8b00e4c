"""scripts/device_run.sh --dry: the GPU device run rehearsed on the CPU, every phase, so that the run on the device is
never the script's first run. Tiny models, a few hundred shipped images, one epoch; no ../shared needed (the wheels
in .whl/ are installed when scripts/device_prepare.sh has been run, else the installed packages are used)."""
import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def test_dry_device_run_runs_every_phase_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    # the script's python3 is this interpreter (a venv's, whether activated or not), as python3 is on the device
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OUT": str(out), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "device_run.sh"), "--dry"], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "cifar10.json", "cuda_tests.xml", "env.json", "log"]
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["dry"] and env_info["clcli_commit"]
    assert set(env_info["phases"]) == {"install", "env", "cuda_tests", "bench", "bench_compile", "bench_summary",
                                       "cifar10"}
    assert all(p["rc"] == 0 for p in env_info["phases"].values()), env_info["phases"]
    assert not any(v.startswith("error") for v in env_info["packages"].values()), env_info["packages"]
    bench = json.loads((out / "bench.json").read_text())
    for variant in ("eager", "compiled"):
        steps = bench[variant]["summary"]["ms_per_step"]
        assert set(steps) == {"il:test_resnet", "il:test_efficientnet", "cl"} and all(v > 0 for v in steps.values())
    assert bench["compiled"]["result"]["compile"] and not bench["eager"]["result"]["compile"]
    cifar = json.loads((out / "cifar10.json").read_text())
    assert cifar["status"] == "done" and cifar["epochs"] == 1
    for method in ("cl", "il"):
        run = cifar["methods"][method]
        assert run["status"] == "finished" and run["epochs_done"] == 1, run
        assert set(run["test_acc_per_epoch"][0]) == {"test_resnet", "test_efficientnet"}
        assert len(run["epoch_seconds"]) == 1 and run["epoch_seconds"][0] > 0
    log = (out / "log").read_text()
    assert "CIFAR-10 plan: 1 epoch(s)" in log
    # The GPU caps before cifar10 and the time kept for it fit the budget; the CUDA tests have a per-test cap
    assert "GPU caps: 355s before cifar10 + 60s kept for it = 415s of the 420s budget" in log
    assert "no pytest-timeout here" not in log and "datasets" in log and "NOT SATISFIED" not in log
    assert bench["compiled"]["result"].get("w2") is None and "wel" in bench["eager"]["result"]  # compiled: steps


def test_a_carried_datasets_that_the_images_packages_do_not_satisfy_stops_the_install(monkeypatch, capsys):
    """The install phase asks whether the image's pyarrow, huggingface_hub and tqdm satisfy the carried datasets, and
    stops naming the one that does not (before a phase fails on an import deep inside datasets)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_phases", REPO / "scripts" / "device_phases.py")
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    assert phases.deps() == 0
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1" if name == "tqdm" else real(name))
    capsys.readouterr()
    assert phases.deps() == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("stop: the carried datasets") and "needs tqdm>=" in last and "the image has 0.1" in last

import os
import signal

import pytest

# Tests never reach the network or write into the home directory.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Session-wide, so module-scoped fixtures (which run before function-scoped ones) see it too."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    env = {"CLCLI_CACHE": str(cache / "clcli"), "HF_HOME": str(cache / "hf"),
           "HF_DATASETS_CACHE": str(cache / "hf" / "datasets")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def signals_not_ignored():
    """A parent that ignores SIGINT or SIGHUP (`nohup`, a background job of a script) passes that on to this process
    and to the commands it starts, and clcli rightly leaves an ignored signal ignored; tests that stop a run
    send them (test_faults.py, test_gpu_paths.py, test_tune.py), so the suite passes however it is started."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL}
    ignored = [s for s in defaults if signal.getsignal(s) is signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, defaults[s])
    yield
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)

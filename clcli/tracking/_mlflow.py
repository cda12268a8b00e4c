"""MLflow, through its client: the store of MLFLOW_TRACKING_URI, else a local file store ./mlruns/ (the runs/
folder's neighbour); the experiment from the recipe, MLFLOW_EXPERIMENT_NAME, else "clcli"; `clcli compare`'s runs
under one parent run; `clcli export --log`'s files as artifacts of the run's MLflow run (`logged_run`, `log_files`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from clcli.errors import ClcliError

from ._base import Context, Tracker, position_of

_MAX_PARAMS = 100     # per log_batch call (MLflow's limit)
_MAX_VALUE = 6000     # characters of a parameter's value (MLflow's limit)


def tracking_uri(previous: dict) -> str:
    """The store a run logs to: the one it started with (resuming), MLFLOW_TRACKING_URI, else ./mlruns."""
    uri = previous.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless told; a local store needs no server
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def client(previous: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(previous))


def logged_run(info: dict) -> dict:
    """The MLflow run a run folder logged to (the ids in its run.json); one line when there is none."""
    ids = info.get("tracking", {}).get("mlflow")
    if not ids:
        raise ClcliError("--log: this run was not logged to MLflow (train it with --log mlflow); its exported files "
                         "go to its MLflow run")
    return ids


def log_files(ids: dict, paths: list[Path], folder: str) -> None:
    """Files as artifacts of the MLflow run `ids` (`logged_run`), under `folder`."""
    mlflow = client(ids)
    for path in paths:
        mlflow.log_artifact(ids["run_id"], str(path), folder)


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, ctx: Context, note):
        from mlflow.entities import Param

        self.client = client(ctx.previous)
        self.uri = tracking_uri(ctx.previous)
        self.run_id = ctx.previous.get("run_id")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            self.held = self._held()
            return
        name = ctx.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "clcli"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"clcli.run_folder": str(ctx.run_dir.resolve())}
        if ctx.group:
            tags["mlflow.parentRunId"] = self._parent(experiment_id, ctx.group)
        self.run_id = self.client.create_run(experiment_id, run_name=ctx.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:_MAX_VALUE]) for k, v in ctx.hparams.items()]
        for i in range(0, len(params), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + _MAX_PARAMS])
        for key, text in ctx.texts.items():
            self.client.log_text(self.run_id, text, f"{key}.txt")

    def _held(self) -> tuple[int, int]:
        """Where the logged run stops (resuming): its metrics' histories, read once."""
        steps: dict[int, set[str]] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            for metric in self.client.get_metric_history(self.run_id, key):
                steps.setdefault(metric.step, set()).add(key)
        return position_of(steps)

    def _parent(self, experiment_id: str, group: str) -> str:
        """The group's parent run, found by its tag or made (every `clcli compare` run of that group under it)."""
        found = self.client.search_runs([experiment_id], f"tags.`clcli.group` = '{group}'", max_results=1)
        if found:
            return found[0].info.run_id
        parent = self.client.create_run(experiment_id, run_name=group, tags={"clcli.group": group}).info.run_id
        self.client.set_terminated(parent)  # it holds no metrics of its own: its children run
        return parent

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, table: str) -> None:
        self.client.log_text(self.run_id, table, "results.md")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))

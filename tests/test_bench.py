"""clcli bench: one JSON object with the step times, their ratio, the MKB overhead, the pipeline and W2 costs."""
import json

import torch
from typer.testing import CliRunner

from clcli.cli import app

from _helpers import TINY


def test_bench_measures_il_and_cl_on_one_batch_and_reports_json():
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["bench", *TINY, "--batch-size", "16", "--threads", "1", "--seconds", "0",
                                          "--rounds", "2", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert set(r["step_seconds"]) == {f"il:{TINY[0]}", f"il:{TINY[1]}", "cl"}
    assert r["rounds"] >= 2 and r["threads"] == 1
    assert all(v > 0 for v in r["step_seconds"].values()) and all(v > 0 for v in r["step_cpu_seconds"].values())
    il_sum = sum(v for k, v in r["step_cpu_seconds"].items() if k.startswith("il:"))
    assert abs(r["ratio_cl_over_il_sum"] - r["step_cpu_seconds"]["cl"] / il_sum) < 1e-3  # from unrounded times
    assert r["goal_met"] == (r["ratio_cl_over_il_sum"] <= 1.10)
    # CL runs both networks plus the MKBs and the collaborative losses: more operators than both alone
    assert r["ops_per_step"]["cl"] > r["ops_per_step"][f"il:{TINY[0]}"] + r["ops_per_step"][f"il:{TINY[1]}"]
    site = r["mkb"][0]
    assert len(site["param_overhead"]) == 2 and all(0 < f < 1 for f in site["param_overhead"])
    assert r["pipeline"]["images_per_s"] > 0
    assert r["w2"]["seconds_per_step_uncached"] > r["w2"]["seconds_per_step_cached"] > 0
    assert r["wel"]["pairs_per_step"] == 8 and r["wel"]["seconds_per_step_new_pairs"] > 0


def test_bench_steps_with_the_optimiser_training_builds_from_the_recipe():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from clcli.bench import make_steps

    def stepped_optimisers(overrides):
        stepped = []
        hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: stepped.append(optimizer))
        try:
            steps, _, _ = make_steps(list(TINY), batch_size=4, device="cpu", overrides=overrides)
            for step in steps.values():
                step()
        finally:
            hook.remove()
        return stepped

    adamw = stepped_optimisers(["train.opt=adamw", "train.lr=0.003", "train.weight_decay=0.05"])
    assert len(adamw) == 3 and all(type(o) is torch.optim.AdamW for o in adamw)  # IL A, IL B, CL
    assert {(g["lr"], g["weight_decay"]) for o in adamw for g in o.param_groups} == {(0.003, 0.05)}
    default = stepped_optimisers([])  # the recipe's defaults: SGD, momentum 0.9, weight decay 1e-4
    assert all(type(o) is torch.optim.SGD and o.defaults["momentum"] == 0.9 for o in default)


def test_bench_set_takes_the_train_keys_only():
    from clcli.errors import ClcliError

    result = CliRunner().invoke(app, ["bench", *TINY, "--set", "input_size=64", "--json"])
    assert isinstance(result.exception, ClcliError) and "train.*" in str(result.exception)

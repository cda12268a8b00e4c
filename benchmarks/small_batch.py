"""How small a batch trains? Each network's first convolution's weight norm and the classification loss, step by
step, for one method at one batch size (the quickstart recipe: resnet10t + mobilenetv3_small_050 at 32 px, SGD lr
0.05), optionally with more recipe overrides (train.clip_grad=1.0).

    python benchmarks/small_batch.py METHOD BATCH STEPS [KEY=VALUE ...]
    python benchmarks/small_batch.py cl 2 24 train.clip_grad=1.0

Prints steps 1, 2 and the last; docs/results.md has the table and what it shows.
"""
from __future__ import annotations

import sys
import tempfile


def main(argv: list[str]) -> None:
    import torch

    from clcli import recipes
    from clcli.train import _loop, train

    method, batch, steps, *extra = argv
    batch, steps = int(batch), int(steps)
    torch.set_num_threads(1)
    recipe = recipes.load("quickstart", [f"methods=[{method}]", f"train.batch_size={batch}",
                                         f"data.train_limit={batch * steps}", "data.test_limit=50", "train.epochs=1",
                                         "train.log_every=1000", *extra])
    step_fn, rows = _loop.train_step, []

    def recorded(model, b, optimizer, **kwargs):
        out = step_fn(model, b, optimizer, **kwargs)
        nets = getattr(model, "module", model).cohort.networks
        norms = [round(next(p for p in net.parameters() if p.dim() == 4).norm().item(), 2) for net in nets]
        rows.append((norms, {k: round(v.item(), 3) for k, v in out["parts"].items() if k.endswith("cls")}))
        return out

    _loop.train_step = recorded  # the loop calls it by this name
    with tempfile.TemporaryDirectory() as out:
        train(recipe, f"{out}/run", show_progress=False)
    for i, (norms, losses) in enumerate(rows):
        if i < 2 or i == len(rows) - 1:
            print(f"{method} batch {batch} step {i + 1}: first-conv weight norms {norms}, loss {losses}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Small real settings shared by the training and export tests: two tiny timm networks on a slice of the
shipped CIFAR-10 subset."""
from clcli import recipes
from clcli.data import QUICKSTART_DIR

TINY = ["test_resnet", "test_efficientnet"]


def tiny_recipe(models=None, methods=("cl",), epochs=2, **cl):
    return recipes.from_dict({
        "name": "tiny",
        "models": list(models or TINY),
        "methods": list(methods),
        "input_size": 32,
        "stem": "small",
        "data": {"source": str(QUICKSTART_DIR), "train_limit": 256, "test_limit": 200, "augment": "crop_flip"},
        "cl": dict(cl),
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "log_every": 4,
                  "threads": 2},
    })


def tiny_args(out, epochs=2):
    return ["train", "--recipe", "quickstart", "--models", *TINY, "--epochs", str(epochs), "--out", str(out),
            "--no-progress", "--set", "data.train_limit=256", "--set", "data.test_limit=200",
            "--set", "train.batch_size=32", "--set", "methods=[cl]", "--set", "train.threads=2"]

"""clcli uses only the public names of timm and torchvision: no `_private` module, function, constant or attribute of
theirs, which a minor release may change or remove without notice (see docs/architecture.md). Read from the source
with `ast`: imports from a private module or of a private name, and private attributes of a module or name bound from
timm or torchvision (`timm_aa._LEVEL_DENOM`, `TrivialAugmentWide._AUGMENTATION_SPACE`, `getattr(x, "_y")`).

Not seen: a private attribute of an object that travelled through a variable or a call
(`applier._apply_image_or_video_transform` on a TrivialAugmentWide made elsewhere); the review has to catch those."""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("timm", "torchvision")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _theirs(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in PACKAGES


def private_references(source: str) -> list[str]:
    """`line: text` of each reference in `source` to a private name of timm or torchvision."""
    tree = ast.parse(source)
    bound: set[str] = set(PACKAGES)  # names that stand for a timm or torchvision module or object
    found = []

    def report(node, what):
        found.append(f"{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _theirs(alias.name):
                    if any(_private(part) for part in alias.name.split(".")):
                        report(node, f"import {alias.name}")
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and _theirs(node.module):
            if any(_private(part) for part in node.module.split(".")):
                report(node, f"from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)

    def root(node) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and root(node.value) in bound:
            report(node, ast.unparse(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)
              and root(node.args[0]) in bound):
            report(node, ast.unparse(node))
    return sorted(set(found), key=lambda line: int(line.split(":")[0]))


def test_clcli_refers_to_no_private_name_of_timm_or_torchvision():
    sources = [path for folder in ("clcli", "benchmarks", "scripts") for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    found = {str(path.relative_to(ROOT)): refs for path in sources
             if (refs := private_references(path.read_text(encoding="utf-8")))}
    assert not found, f"private names of timm or torchvision: {found}"


@pytest.mark.parametrize("line", [
    "from timm.data import auto_augment as timm_aa\nx = timm_aa._LEVEL_DENOM",
    "import timm.data.auto_augment\nx = timm.data.auto_augment._LEVEL_DENOM",
    "from timm.data.auto_augment import _LEVEL_DENOM",
    "from timm.models._builder import build_model_with_cfg",
    "from timm.models import _builder",
    "import timm.layers._fx as fx",
    "from torchvision.transforms.v2 import TrivialAugmentWide\nspace = TrivialAugmentWide._AUGMENTATION_SPACE",
    "from torchvision.transforms.v2 import TrivialAugmentWide as T\nT(fill=1)._apply_image_or_video_transform(x)",
    "import torchvision\nf = getattr(torchvision.transforms.v2.functional, '_geometry')",
])
def test_the_scan_finds_each_kind_of_private_reference(line):
    assert private_references(line)


def test_the_scan_passes_public_names_and_clcli_own_private_ones():
    assert not private_references("import timm\nfrom timm.data import auto_augment as aa\n"
                                  "from clcli.data import _autoaugment\nv = timm.__version__\n"
                                  "op = aa.AugmentOp('Rotate')\n_autoaugment._private_helper()\n"
                                  "self._x = aa.rand_augment_transform('rand-m9', None)")


def test_the_scan_finds_what_the_old_auto_augment_used():
    """The in-memory auto-augment before it went public-only (commit ef34145) read timm's `_LEVEL_DENOM` and
    torchvision's `_AUGMENTATION_SPACE`; the scan finds both."""
    try:
        old = subprocess.run(["git", "show", "ef34145:clcli/data/_autoaugment.py"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no git here")
    if old.returncode != 0:
        pytest.skip("the old commit is not in this checkout")
    found = " ".join(private_references(old.stdout))
    assert "_LEVEL_DENOM" in found and "_AUGMENTATION_SPACE" in found

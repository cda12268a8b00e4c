"""Predefined training folds (the STL-10 protocol): train on one fold of the training split, test on the whole test
split, report the mean over the folds.

The fold file is the STL-10 release's `fold_indices.txt` format: one line per fold, each line the 0-based row
numbers of that fold's training images in the training split, separated by whitespace (or commas). In the official
release (stl10_binary/fold_indices.txt) there are 10 lines of 1,000 indices into the 5,000 training images; the
folds overlap. (The paper, section IV-A, says 500 images per fold; the file decides.)
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from clcli.errors import ClcliError


def fold_file(folds: str, source: str | None) -> Path:
    """The fold-indices file `folds` names: an absolute path, a path relative to the data folder `source` (when
    `source` is a local folder and the file is there), or a path relative to the working directory."""
    path = Path(folds).expanduser()
    if not path.is_absolute() and source is not None:
        in_data = Path(source).expanduser() / path
        if in_data.is_file():
            return in_data.resolve()
    if path.is_file():
        return path.resolve()
    local = source is not None and Path(source).expanduser().is_dir()
    where = (f" (looked in {source} and the working directory)" if local else
             f" (the data source {source} is not a local folder)" if source else "") if not path.is_absolute() else ""
    raise ClcliError(f"fold-indices file '{folds}' not found{where}; pass --data FOLDER holding it or "
                     f"--set data.folds=/path/to/{path.name}: one fold of training-row indices per line "
                     f"(STL-10: stl10_binary/fold_indices.txt of the release)")


def read_folds(path: str | os.PathLike) -> list[torch.Tensor]:
    """The folds of a fold-indices file, as int64 index tensors (blank lines ignored)."""
    from clcli import files

    path = Path(path)
    text = files.read_text(path, "fold-indices file")
    folds = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = [t for t in re.split(r"[\s,]+", line.strip()) if t]
        if not tokens:
            continue
        if not all(t.isdigit() for t in tokens):
            bad = next(t for t in tokens if not t.isdigit())
            raise ClcliError(f"{path} line {lineno}: '{bad}' is not a row index (expected whole numbers >= 0)")
        folds.append(torch.tensor([int(t) for t in tokens], dtype=torch.int64))
    if not folds:
        raise ClcliError(f"fold-indices file {path} holds no folds")
    return folds


def fold_rows(folds: list[torch.Tensor], fold: int, n_rows: int, path: str | os.PathLike = "folds") -> torch.Tensor:
    """The training-row indices of fold `fold`, checked against a training split of `n_rows` rows."""
    if not 0 <= fold < len(folds):
        raise ClcliError(f"data.fold={fold} but {path} has {len(folds)} folds (0..{len(folds) - 1})")
    rows = folds[fold]
    if int(rows.max()) >= n_rows:
        raise ClcliError(f"fold {fold} of {path} names row {int(rows.max())} but the training split has {n_rows} "
                         f"rows (indices are 0-based rows of the full training split; drop data.train_limit)")
    return rows


__all__ = ["fold_file", "read_folds", "fold_rows"]

"""MKB w/o CL: every network carries the MKB structure (its own encoder, space transfer and decoder at each site,
shared with nobody) and trains on its labels alone: no metric loss, no verification. It separates what the MKB
layers add as extra capacity from what collaborative learning through them adds (paper section IV-C)."""
from __future__ import annotations

from ._base import register
from .il import IndividualLearning


@register("mkb-solo")
class MKBWithoutCL(IndividualLearning):
    uses_mkb = True
    shared_transfer = False
    recipe_sections = ("cl",)  # the MKB structure and fusion

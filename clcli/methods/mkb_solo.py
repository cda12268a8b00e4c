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
    recipe_sections = ("cl",)  # the MKB structure and fusion; the input and manner of CL, for a like comparison

    def __init__(self, cohort, *, cl):
        super().__init__(cohort)
        self.input, self.iterative = cl.input, cl.manner == "iterative"
        # The cohort builds verification heads for every MKB method; without a verification term they would get no
        # gradient, which DDP (told that every trainable parameter gets one: `per_network`) stops at. Frozen.
        cohort.verifiers.requires_grad_(False)

"""The allowed values of the training config's string fields, torch-free.

They live here rather than in ``training.config`` because both sides need them: the config
checks values (and ``sdde train --help`` lists them) without importing torch, while the torch
modules that branch on them (``training.ensemble``, ``training.saliency``) must not import
``training.config``, whose ``resolve()`` imports those very modules (an import cycle).
A method option's choices are declared on its ``registry.Option``; they are repeated here by
reference, not by value.
"""

from __future__ import annotations

from training import registry

SALIENCY_CHOICES = registry.SALIENCY.choices
DIVERSITY_BN_CHOICES = registry.DIVERSITY_BN.choices
AUGMENT_CHOICES = ("auto", "none", "crop", "crop-flip")
BEST_METRIC_CHOICES = ("acc", "nll")
BACKEND_CHOICES = ("loop", "fused")

"""Evaluation of exported models: OOD metrics, diversity, CAM similarity, reports (numpy only).

* :mod:`.metrics` — AUROC, AUPR-In/Out, FPR@95 (ID positive), scikit-learn-compatible ties.
* :mod:`.diversity` — the SDDE paper's Table 1 diversity metrics.
* :mod:`.cams` — mean pairwise cosine similarity of member CAMs (official normalisation).
* :mod:`.evaluate` — run an ONNX model on ID and OOD data and compute everything.
* :mod:`.corruptions` — the common corruptions (CIFAR-10-C parameters), seeded, any image size.
* :mod:`.shift` — accuracy, calibration and the OOD flag under corruption shift (``--shift``).
* :mod:`.members` — quality against the number of members (``--members-sweep``).
* :mod:`.report` — metrics.json, report.md and PNG plots (matplotlib, the ``[eval]`` extra);
  :mod:`.sections` registers the optional analyses' report sections.
* :mod:`.cli` — ``sdde eval``.
"""

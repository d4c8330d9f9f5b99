"""Evaluation of exported models: OOD metrics, diversity, CAM similarity, reports (numpy only).

* :mod:`.evaluate` — run an ONNX model on ID and OOD data, score every set, run the sections.
* :mod:`.section` — the one interface of a report section (compute, markdown, plots, summary);
  :mod:`.sections` registers the built-in ones, in report order:
  :mod:`.classification`, :mod:`.ood_table`, :mod:`.conformal_eval`, :mod:`.diversity`,
  :mod:`.cams`, :mod:`.consistency`, :mod:`.shift` (``--shift``), :mod:`.members`
  (``--members-sweep``).
* :mod:`.metrics` — AUROC, AUPR-In/Out, FPR@95 (ID positive), scikit-learn-compatible ties.
* :mod:`.corruptions` — the common corruptions (CIFAR-10-C parameters), seeded, any image size.
* :mod:`.results` — what an evaluation holds (scored sets, metrics).
* :mod:`.report` — metrics.json and report.md; :mod:`.plotting` — matplotlib (the ``[eval]``
  extra) and PNG writes.
* :mod:`.cli` — ``sdde eval``.
"""

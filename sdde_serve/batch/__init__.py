"""Batch scoring (``sdde score``): the server's preprocessing and scoring, offline, at scale.

* :mod:`.inputs` enumerates image paths lazily and deterministically;
* :mod:`.job` is the one job runner every backend goes through: options, the tally/journal of
  progress, the run-and-report path (resume, ``--fdr``, summary, exit codes);
* :mod:`.pipeline` decodes in a thread (or process) pool while the engine scores full batches;
* :mod:`.writers` writes rows/errors crash-safely with a resume journal;
* :mod:`.remote` scores against a running server (``--url``);
* :mod:`.ray_backend` runs the job as a Ray Data pipeline (``--ray``);
* :mod:`.cli` is the ``sdde score`` command; it picks the backend (``BACKENDS``).
"""

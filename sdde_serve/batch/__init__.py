"""Batch scoring (``sdde score``): the server's preprocessing and scoring, offline, at scale.

* :mod:`.inputs` enumerates image paths lazily and deterministically;
* :mod:`.pipeline` decodes in a thread pool while the engine scores full batches;
* :mod:`.writers` writes rows/errors crash-safely with a resume journal;
* :mod:`.remote` scores against a running server (``--url``);
* :mod:`.ray_backend` runs the job as a Ray Data pipeline (``--ray``);
* :mod:`.cli` is the ``sdde score`` command.
"""

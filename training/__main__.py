"""``python -m training ...`` and ``torchrun --nproc_per_node=K -m training ...``.

The same command as ``sdde train ...`` (the same parser, errors and exit codes).
"""

import sys

from sdde_serve.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

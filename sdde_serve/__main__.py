import sys

from sdde_serve.cli import main

sys.exit(main())

"""python -m attncap.cli: the attncap command."""
import sys

from . import main

sys.exit(main())

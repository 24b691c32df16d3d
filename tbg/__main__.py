"""`python -m tbg`: the same command as `tbg`."""
import sys

from tbg.cli import main

sys.exit(main())

"""`python -m mdgen_helpers <subcommand> ...`"""

import sys

from mdgen_helpers.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`bt-trl reproduce` (bt_trl/cli/reproduce.py) as a script."""

import sys

from bt_trl.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", *sys.argv[1:]]))

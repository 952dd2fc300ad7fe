"""`bt-trl train` (bt_trl/cli/train.py) as a script, for `accelerate launch scripts/train.py --config recipe.yaml`."""

import sys

from bt_trl.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))

"""`python -m bt_trl.cli ...` is `bt-trl ...` (for `accelerate launch -m bt_trl.cli train ...`)."""

from bt_trl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""The main job: python -m experiments.train --config=configs/lm.py:tiny --workdir=DIR

The same as the installed `effjax-train` command; see effjax/train/cli.py (or --help).
"""
from effjax.train.cli import run

if __name__ == "__main__":
  run()

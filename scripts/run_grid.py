"""= ``fedmarket grid`` (kept so that older command lines keep working): a grid of configs × seeds as parallel
single-seed processes, then each config's seeds merged. The job pool is `fedmarket.lab.grid`; see docs/lab.md.

    python scripts/run_grid.py configs/xmrec_fedmm.yaml configs/xmrec_fedavg.yaml --seeds 0 1 2 --jobs 14 --out runs/grid
"""

import sys

from fedmarket.cli import main

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))

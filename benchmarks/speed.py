"""Speed and memory of each method next to SDPA: ``python benchmarks/speed.py --help``.

The implementation lives in ``lshattn/bench.py`` so that ``lshattn bench`` runs the same code;
results are recorded in docs/benchmarks.md with the command that produced them.
"""

import argparse
import sys

from lshattn import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))

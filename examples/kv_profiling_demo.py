"""Seed-page script form of ``sage-kv-stats demo``: same options, same output.

python examples/kv_profiling_demo.py --num-accesses 500 --output stats.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.main import cli

if __name__ == "__main__":
    cli(["demo", *sys.argv[1:]], prog_name="kv_profiling_demo.py")

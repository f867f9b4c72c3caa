"""Seed-page script form of ``sage-kv-stats visualize``: same options, same output.

python scripts/visualize_access_pattern.py --input stats.json --type all --summary
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.main import cli

if __name__ == "__main__":
    cli(["visualize", *sys.argv[1:]], prog_name="visualize_access_pattern.py")

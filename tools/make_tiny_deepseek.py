"""Write the tiny random-weight DeepSeek-V3-architecture GGUF used by the tests.

    python tools/make_tiny_deepseek.py OUT.gguf [--seed N]

Then `aicc serve --model OUT.gguf` serves it (the deepseek-v3 chat template is picked from
the architecture and name).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from tests.models.tiny_deepseek import write_tiny_deepseek


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")
    args = parser.parse_args()
    path = write_tiny_deepseek(args.out, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

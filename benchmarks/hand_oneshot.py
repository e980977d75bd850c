"""``python benchmarks/hand_oneshot.py prepare|run ...``: the hand radiograph benchmark from a source checkout.

The same as ``python -m samembed_bench.hand_oneshot``; everything (data, split, methods, command line) lives in
:mod:`samembed_bench.hand_oneshot`.
"""

import sys

from samembed_bench.hand_oneshot import main

if __name__ == "__main__":
    sys.exit(main())

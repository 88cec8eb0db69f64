"""bench/train: thin entry point; the code lives in spd.bench.train (same options as `spd bench train`)."""
import sys

from spd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))

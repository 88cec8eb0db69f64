"""bench/svd: thin entry point; the code lives in spd.bench.svd (same options as `spd bench svd`)."""
import sys

from spd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "svd", *sys.argv[1:]]))

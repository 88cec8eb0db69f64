"""bench/hooks: thin entry point; the code lives in spd.bench.hooks (same options as `spd bench hooks`)."""
import sys

from spd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "hooks", *sys.argv[1:]]))

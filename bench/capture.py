"""bench/capture: thin entry point; the code lives in spd.bench.capture (same options as `spd bench capture`)."""
import sys

from spd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "capture", *sys.argv[1:]]))

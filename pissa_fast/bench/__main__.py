"""`python -m pissa_fast.bench ...`: the same as `pissa-fast bench ...`."""
import argparse
import sys

from . import add_arguments_bench, run_bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pissa-fast bench",
                                     description="benchmark niter x rank against exact SVD and the peft path")
    add_arguments_bench(parser)
    return int(run_bench(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())

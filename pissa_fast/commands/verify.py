"""`pissa-fast verify MODEL [--adapter DIR]`: parses into pissa_fast.verify. Exit status 0 when the adapter
sits on its own residual, 1 when not (or the answer is unknown), 2 for unreadable inputs."""
from __future__ import annotations

import argparse
import json

from ._common import report_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model folder the adapter will be loaded on (OUT of pissa-fast "
                                                  "init, or any other checkpoint folder to check)")
    p.add_argument("--adapter", default=None, help="the adapter pissa-fast init wrote (default MODEL/pissa_init)")
    p.add_argument("--json", action="store_true", help="print the per-layer findings as JSON too")


def run(args) -> int:
    from ..pairing import verify

    def go():
        report = verify(args.model, adapter=args.adapter)
        print(f"pissa-fast verify: {report.status}: {report.message}")
        if args.json:
            print(json.dumps({"paired": report.paired, "status": report.status, "layers": report.layers}, indent=1))
        return 0 if report.paired else 1
    return report_errors("verify", go)

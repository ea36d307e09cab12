"""The `lampy` command: `lampy worker` (a local OpenLambda-compatible worker), `lampy deploy`,
`lampy serve` (an array server for remote arrays) and `lampy calibrate` (measure the lazy
arrays' cost constants on this machine)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lampy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run an OpenLambda-compatible worker")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=5000)
    worker.add_argument("--registry", type=Path, help="directory of uploaded lambdas")
    worker.add_argument("--max-sandboxes", type=int, help="default: twice the CPU count")
    worker.add_argument(
        "--runtime-limit", type=float, default=30.0, help="seconds per call (default 30)"
    )
    worker.add_argument(
        "--chaos",
        metavar="PLAN",
        help="inject faults into calls, e.g. 'kill=0.05,502=0.05,429=0.05,hang=0.02,"
        "reset=0.02,corrupt=0.01,duplicate=0.02' (for testing; counts in /stats)",
    )
    worker.add_argument(
        "--chaos-seed", type=int, default=0, help="seed of the --chaos plan (default 0)"
    )

    deploy = commands.add_parser("deploy", help="build lampy's lambda and upload or save it")
    target = deploy.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the OpenLambda worker, e.g. http://127.0.0.1:5000")
    target.add_argument("--output", type=Path, help="write the tar.gz here instead")
    deploy.add_argument("--name", default="lampy", help="the lambda's name (default lampy)")

    commands.add_parser("calibrate", help="measure lazy-array cost constants on this machine")

    server = commands.add_parser("serve", help="serve the .npy files of a directory by range")
    server.add_argument("directory", type=Path)
    server.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    server.add_argument("--port", type=int, default=5050)
    server.add_argument("--max-upload", type=int, help="largest PUT in bytes (default 8 GiB)")

    args = parser.parse_args(argv)
    if args.command == "calibrate":
        from lampy.lazy._cost import calibrate

        for constant, value in sorted(calibrate().items()):
            unit = "flop/s" if constant.startswith("gemm_flops") else "s per element"
            print(f"{constant:>18}  {value:.3g} {unit}")
        return 0
    if args.command == "serve":
        from lampy.runtime.remote._server import MAX_UPLOAD_BYTES
        from lampy.runtime.remote._server import serve as serve_arrays

        serve_arrays(args.directory, args.host, args.port, args.max_upload or MAX_UPLOAD_BYTES)
        return 0
    if args.command == "worker":
        from lampy._errors import OptionError
        from lampy.runtime.openlambda._chaos import FaultPlan
        from lampy.runtime.openlambda._worker import serve

        try:
            plan = None if args.chaos is None else FaultPlan.parse(args.chaos, args.chaos_seed)
        except OptionError as exc:
            worker.error(str(exc))  # exits with status 2 and the usage line
        serve(args.host, args.port, args.registry, args.max_sandboxes, args.runtime_limit, plan)
        return 0
    from lampy.runtime.openlambda import _deploy as packaging

    if args.output is not None:
        args.output.write_bytes(packaging.build())
        print(
            f"wrote {args.output}; upload it with: curl --data-binary @{args.output} "
            f"http://HOST:5000/registry/{args.name}"
        )
        return 0
    try:
        print(packaging.upload(args.url, args.name))
    except (RuntimeError, OSError) as exc:
        print(f"lampy deploy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

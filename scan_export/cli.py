"""`scan-export`: each subcommand maps its flags onto one library function."""

from __future__ import annotations

import argparse
import sys


def _add_scan(sub):
    p = sub.add_parser("scan", help="write a standalone selective-scan op model")
    p.add_argument("--dim", type=int, default=None, help="channels d (dynamic when left out)")
    p.add_argument("--dstate", type=int, default=None, help="state size n (dynamic when left out)")
    p.add_argument("--groups", type=int, default=1, help="groups of B/C; 1 gives B, C: (batch, dstate, seqlen)")
    p.add_argument("--no-D", dest="with_D", action="store_false", help="leave out the D skip input")
    p.add_argument("--no-z", dest="with_z", action="store_false", help="leave out the z gate input")
    p.add_argument("--no-delta-bias", dest="with_delta_bias", action="store_false")
    p.add_argument("--no-initial-state", dest="with_initial_state", action="store_false")
    p.add_argument("--no-softplus", dest="delta_softplus", action="store_false")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"])
    p.add_argument("--target", default="portable", help="runtime to target (sets IR version and opset)")
    p.add_argument("--opset", type=int, default=None, help="override the target's opset")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_scan)


def scan_spec_from_args(args):
    from .onnx.scan_model import ScanModelSpec
    from .reference import DEFAULT_CHUNK_SIZE

    return ScanModelSpec(
        dim=args.dim, dstate=args.dstate, groups=args.groups, with_D=args.with_D, with_z=args.with_z,
        with_delta_bias=args.with_delta_bias, with_initial_state=args.with_initial_state,
        delta_softplus=args.delta_softplus, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE, dtype=args.dtype,
    )


def cmd_scan(args):
    from .onnx.export import save_model
    from .onnx.scan_model import build_scan_model

    spec = scan_spec_from_args(args)
    model = build_scan_model(spec, target=args.target, opset=args.opset)
    path = save_model(model, args.out)
    print(f"wrote {path}: {len(model.graph.node)} top-level nodes, IR {model.ir_version}, "
          f"opset {model.opset_import[0].version}, inputs {[i.name for i in model.graph.input]}")
    return 0


def _add_check(sub):
    p = sub.add_parser("check", help="run an op model against the float64 sequential reference")
    p.add_argument("model")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rtol", type=float, default=None)
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    from .check import DEFAULT_RTOL, check_scan_model, format_rows

    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL
    rows = check_scan_model(args.model, provider=args.provider, rtol=rtol)
    print(format_rows(rows, rtol))
    return 0 if all(r.passed for r in rows) else 1


def _add_bench(sub):
    p = sub.add_parser("bench", help="time the scan implementations side by side")
    p.add_argument("--regime", default="init", choices=["easy", "init", "heavy"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args):
    from .bench import bench_scan, format_scan_bench, write_json

    results = bench_scan(regime=args.regime, repeats=args.repeats, chunk_size=args.chunk_size)
    print(format_scan_bench(results))
    if args.json_path:
        write_json(results, args.json_path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scan-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_scan, _add_check, _add_bench):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"scan-export {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`scan-export`: each subcommand maps its flags onto one library function."""

from __future__ import annotations

import argparse
import sys


def _add_scan(sub):
    from .onnx.targets import DEFAULT_SCAN_FORM, SCAN_FORMS

    p = sub.add_parser("scan", help="write a standalone selective-scan op model")
    p.add_argument("--dim", type=int, default=None, help="channels d (dynamic when left out)")
    p.add_argument("--dstate", type=int, default=None, help="state size n (dynamic when left out)")
    p.add_argument("--groups", type=int, default=1, help="groups of B/C; 1 gives B, C: (batch, dstate, seqlen)")
    p.add_argument("--no-D", dest="with_D", action="store_false", help="leave out the D skip input")
    p.add_argument("--no-z", dest="with_z", action="store_false", help="leave out the z gate input")
    p.add_argument("--no-delta-bias", dest="with_delta_bias", action="store_false")
    p.add_argument("--no-initial-state", dest="with_initial_state", action="store_false")
    p.add_argument("--no-softplus", dest="delta_softplus", action="store_false")
    p.add_argument("--scan-form", default=DEFAULT_SCAN_FORM, choices=list(SCAN_FORMS),
                   help="a Scan over time steps (sequential) or a Loop over chunks (chunked)")
    p.add_argument("--chunk-size", type=int, default=None, help="the chunked form's T")
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
        scan_form=args.scan_form,
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
    p.add_argument("--rtol", type=float, default=None,
                   help="relative error allowed per output; default by the model's dtype: "
                        "float32 1e-5, float16 1e-3, float64 1e-12")
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    from .check import check_scan_model, format_rows

    rows = check_scan_model(args.model, provider=args.provider, rtol=args.rtol)
    print(format_rows(rows, args.rtol))
    return 0 if all(r.passed for r in rows) else 1


def _add_bench(sub):
    p = sub.add_parser("bench", help="time the scan implementations side by side")
    p.add_argument("--regime", default="init", choices=["easy", "init", "heavy"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    p.add_argument("--model", action="store_true", help="whole-model prefill/decode vs transformers instead of the scan")
    p.add_argument("--ssd", action="store_true", help="the Mamba-2 SSD scan instead of the Mamba-1 scan")
    p.add_argument("--configs", default="tiny,130m", help="with --model: comma-separated, from tiny,130m")
    p.add_argument("--model-type", default="mamba", choices=["mamba", "mamba2"], help="with --model")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args):
    from .bench import (bench_model, bench_scan, bench_ssd, format_model_bench, format_scan_bench, format_ssd_bench,
                        write_json)

    if args.ssd:
        results = bench_ssd(regime=args.regime, repeats=args.repeats)
        print(format_ssd_bench(results))
    elif args.model:
        results = bench_model(configs=tuple(c for c in args.configs.split(",") if c), prefill_len=args.prefill_len,
                              decode_tokens=args.decode_tokens, repeats=args.repeats, model_type=args.model_type)
        print(format_model_bench(results))
    else:
        results = bench_scan(regime=args.regime, repeats=args.repeats, chunk_size=args.chunk_size)
        print(format_scan_bench(results))
    if args.json_path:
        write_json(results, args.json_path)
    return 0


def _add_export_model(sub):
    from .onnx.targets import DEFAULT_SCAN_FORM, SCAN_FORMS

    p = sub.add_parser("export-model", help="export a local HF Mamba/FalconMamba/Mamba2 checkpoint to ONNX with state I/O")
    p.add_argument("checkpoint_dir")
    p.add_argument("--out", required=True, help="output directory (replaced atomically on success)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--target", default="portable", help="runtime to target: portable, ort-1.18, node-1.30, web-1.30, ort-1.32")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--lowering", default="portable", choices=["portable", "native"],
                   help="Mamba-2 scan: portable Loop (opset 21) or native LinearAttention (opset 27, --target ort-1.32)")
    p.add_argument("--scan-form", default=DEFAULT_SCAN_FORM, choices=list(SCAN_FORMS),
                   help="Mamba-1 scan: a Scan over time steps (sequential; fastest on CPU) or a Loop over chunks "
                        "(chunked; parallel within a chunk)")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args):
    import json

    from .onnx.model_export import DESCRIPTION_FILE, export_model

    out = export_model(args.checkpoint_dir, args.out, dtype=args.dtype, target=args.target, opset=args.opset,
                       lowering=args.lowering, scan_form=args.scan_form)
    d = json.loads((out / DESCRIPTION_FILE).read_text())
    print(f"wrote {out}: {d['model_type']}, {d['num_layers']} layers, vocab {d['vocab_size']}, {d['dtype']}, "
          f"IR {d['ir_version']}, opset {d['opset']}, {d['node_count']} nodes")
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate from an export directory with onnxruntime (no torch)")
    p.add_argument("export_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, tokenized with the export's tokenizer.json")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 5,6,7")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-id", type=int, default=None, help="defaults to the model's eos_token_id")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help='print {"tokens": [...], "text": ...} at the end')
    p.set_defaults(func=cmd_generate)


def generate_options(args) -> dict:
    from .runtime.generate import Sampling

    sampling = Sampling(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    return {"sampling": sampling, "stop_token_id": args.stop_token_id}


def cmd_generate(args):
    import json

    from .runtime.generate import ExportedMamba, generate
    from .runtime.tokenizer import load_tokenizer

    model = ExportedMamba(args.export_dir, args.provider)
    tokenizer = load_tokenizer(args.export_dir, required=args.prompt is not None)
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.input_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--input-ids must be comma-separated integers, got {args.input_ids!r}") from None
    opts = generate_options(args)
    if opts["stop_token_id"] is None:
        opts["stop_token_id"] = model.description.get("eos_token_id")

    def stream(_row, tok):
        piece = tokenizer.decode([tok]) if tokenizer else f"{tok} "
        print(piece, end="", flush=True)

    (tokens,) = generate(model, [ids], args.max_new_tokens, on_token=None if args.json else stream, **opts)
    text = tokenizer.decode(tokens) if tokenizer else None
    if args.json:
        print(json.dumps({"tokens": tokens, "text": text}))
    else:
        print()
    return 0


def _add_verify(sub):
    from .verify import FLOOR, MARGIN

    p = sub.add_parser("verify", help="judge an export against transformers in float64 on its checkpoint")
    p.add_argument("export_dir")
    p.add_argument("--checkpoint", required=True, help="the HF checkpoint directory the export was made from")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rtol", type=float, default=None,
                   help="a fixed bar on each output's relative error (max|err| / max|ref|) against "
                        f"transformers float64. Default: {MARGIN:g} x the error transformers itself makes "
                        "in the export's dtype (float32, or float16 for fp16 exports) against float64, "
                        f"at least {FLOOR['float32']:g} (float32) / {FLOOR['float16']:g} (float16)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args):
    from .verify import verify_export

    report = verify_export(args.export_dir, args.checkpoint, n_tokens=args.tokens, provider=args.provider,
                           rtol=args.rtol)
    print(report.format())
    return 0 if report.passed else 1


def _add_demo(sub):
    p = sub.add_parser("demo", help="tiny Mamba: checkpoint -> export -> onnxruntime generate -> verify")
    p.add_argument("--model-type", default="mamba", choices=["mamba", "falcon_mamba", "mamba2"])
    p.add_argument("--workdir", default=None, help="keep the checkpoint and export here (default: a temp dir)")
    p.add_argument("--tokens", type=int, default=20)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args):
    from .demo import run_demo

    return 0 if run_demo(args.workdir, args.model_type, args.tokens) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scan-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_scan, _add_check, _add_bench, _add_export_model, _add_generate, _add_verify, _add_demo):
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

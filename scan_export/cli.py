"""`scan-export`: each subcommand maps its flags onto one library function.

Every user mistake ends as one line, `scan-export: error: <what>`, and exit code 2: argparse's own
complaints, our ScanExportError, and flags given without the flag they depend on. A traceback means a
bug (or `--debug`). Ctrl-C exits 130, SIGTERM 143, SIGHUP 129, after cleaning up what was staged.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import family_names
from .errors import ScanExportError

PROG = "scan-export"
# the registry's model types (reference/models/families/), read without importing the family files:
# building the parser must not import torch (tests/test_family_registry.py checks the two agree).
MODEL_TYPES = family_names.model_types()
# bench --model --model-type: the families declaring bench shapes, and the --configs names past tiny,130m
# reference.DEFAULT_CHUNK_SIZE, written out: building the parser must not import torch (generate runs
# without it); tests/test_cli.py checks the two agree.
SCAN_CHUNK_SIZE = 16
# The chunked form's graph holds (T, T) constants: T = 4096 builds in ~4 s and 64 MB, 2**20 took
# 4 minutes (measured); a chunk longer than the sequences it runs on only adds padding.
MAX_CHUNK_SIZE = 4096


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a ScanExportError (one line, exit 2) rather than a
    usage dump; `--help` still prints the full usage."""

    def error(self, message):
        sub = self.prog.removeprefix(PROG).strip()
        raise ScanExportError(f"{sub + ': ' if sub else ''}{message} (see {self.prog} --help)")


def _int_at_least(low: int, high: int | None = None, why: str = ""):
    """An integer >= low (and <= high, `why` saying where that bound comes from)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]{why}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float_in(low: float, high: float, low_open: bool = True, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        lo_ok = value > low if low_open else value >= low
        hi_ok = value < high if high_open else value <= high
        if not (math.isfinite(value) and lo_ok and hi_ok):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)
_chunk_size = _int_at_least(1, MAX_CHUNK_SIZE, " (the chunked graph grows with T squared)")
# runtime.generate.MAX_NEW_TOKENS, written out for the same reason as SCAN_CHUNK_SIZE (tests/test_cli.py).
MAX_NEW_TOKENS = 1_000_000
# Every count a user gives is bounded, so that a typo (an extra few zeros) is refused, not run for days.
token_count = _int_at_least(1, MAX_NEW_TOKENS)
repeat_count = _int_at_least(1, 1000)


def require_flag(args, needs: str, flags: dict) -> None:
    """Refuse flags that only mean something with `needs`: flags = {dest: '--flag'}, given when not None."""
    given = [flag for dest, flag in flags.items() if getattr(args, dest) is not None]
    if given:
        raise ScanExportError(f"{args.command}: {', '.join(given)} only apply with {needs}, which was not given")


def _add_scan(sub):
    from .onnx.targets import DEFAULT_SCAN_FORM, SCAN_FORMS, TARGETS

    p = sub.add_parser("scan", help="write a standalone selective-scan op model")
    p.add_argument("--dim", type=positive_int, default=None, help="channels d (dynamic when left out)")
    p.add_argument("--dstate", type=positive_int, default=None, help="state size n (dynamic when left out)")
    p.add_argument("--groups", type=positive_int, default=1, help="groups of B/C; 1 gives B, C: (batch, dstate, seqlen)")
    p.add_argument("--no-D", dest="with_D", action="store_false", help="leave out the D skip input")
    p.add_argument("--no-z", dest="with_z", action="store_false", help="leave out the z gate input")
    p.add_argument("--no-delta-bias", dest="with_delta_bias", action="store_false", help="leave out the delta_bias input")
    p.add_argument("--no-initial-state", dest="with_initial_state", action="store_false",
                   help="leave out the initial_state input")
    p.add_argument("--no-softplus", dest="delta_softplus", action="store_false", help="use delta as given, no softplus")
    p.add_argument("--scan-form", default=DEFAULT_SCAN_FORM, choices=list(SCAN_FORMS),
                   help="a Scan over time steps (sequential) or a Loop over chunks (chunked)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None,
                   help=f"the chunked form's T, at most {MAX_CHUNK_SIZE}; only with --scan-form chunked "
                        f"(default when chunked: {SCAN_CHUNK_SIZE})")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"], help="I/O dtype")
    p.add_argument("--target", default="portable", choices=sorted(TARGETS), help="runtime to target (sets IR version and opset)")
    p.add_argument("--opset", type=_int_at_least(1), default=None, help="override the target's opset")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out even if scan-export did not write it")
    p.set_defaults(func=cmd_scan)


def scan_spec_from_args(args):
    from .onnx.scan_model import ScanModelSpec
    from .reference import DEFAULT_CHUNK_SIZE

    if args.chunk_size is not None and args.scan_form != "chunked":
        raise ScanExportError(f"scan: --chunk-size only applies with --scan-form chunked, "
                              f"got --scan-form {args.scan_form}")
    return ScanModelSpec(
        dim=args.dim, dstate=args.dstate, groups=args.groups, with_D=args.with_D, with_z=args.with_z,
        with_delta_bias=args.with_delta_bias, with_initial_state=args.with_initial_state,
        delta_softplus=args.delta_softplus, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE, dtype=args.dtype,
        scan_form=args.scan_form,
    )


def cmd_scan(args):
    from .onnx.export import save_model, written_by_us
    from .onnx.output_dir import check_output_file
    from .onnx.scan_model import build_scan_model

    spec = scan_spec_from_args(args)
    check_output_file(args.out, force=args.force, ours=written_by_us)  # before any work; save_model checks again
    model = build_scan_model(spec, target=args.target, opset=args.opset)
    path = save_model(model, args.out, force=args.force)
    print(f"wrote {path}: {len(model.graph.node)} top-level nodes, IR {model.ir_version}, "
          f"opset {model.opset_import[0].version}, inputs {[i.name for i in model.graph.input]}")
    return 0


def _add_check(sub):
    p = sub.add_parser("check", help="run an op model against the float64 sequential reference")
    p.add_argument("model", help="an op model written by `scan-export scan`")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    p.add_argument("--rtol", type=_float_in(0, math.inf, high_open=True), default=None,
                   help="relative error allowed per output; default by the model's dtype: "
                        "float32 1e-5, float16 1e-3, float64 1e-12")
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    from .check import check_scan_model, format_rows

    rows = check_scan_model(args.model, provider=args.provider, rtol=args.rtol)
    print(format_rows(rows, args.rtol))
    return 0 if all(r.passed for r in rows) else 1


def _add_bench(sub):
    from .bench import BENCHES, DEFAULT

    p = sub.add_parser("bench", help="time the scan implementations (or a whole model) side by side",
                       description="time implementations side by side in one run: "
                                   + "; ".join(f"{b.name}: {b.help}" for b in BENCHES.values()))
    # add_parser takes no parser class; this one rewrites the old spellings before parsing.
    p.__class__ = _BenchParser
    kinds = {"repeats": repeat_count, "chunk_size": _chunk_size, "token_count": token_count,
             "max_chunk_size": MAX_CHUNK_SIZE}
    benches = _Subparsers(p.add_subparsers(dest="bench", metavar="BENCH", required=True, parser_class=_Parser,
                                           help=f"which bench: {', '.join(BENCHES)} (default: {DEFAULT}, also "
                                                f"when only flags follow `bench`)"))
    p.benches = {}
    for bench in BENCHES.values():
        bp = p.benches[bench.name] = benches.add_parser(bench.name, help=bench.help)
        bench.add_arguments(bp, kinds)
        bp.add_argument("--json", dest="json_path", default=None,
                        help="also write the results here (a new file, or one bench wrote)")
    p.set_defaults(func=cmd_bench)


def _bench_argv(args: list[str]) -> list[str]:
    """The spellings from before `bench NAME`, as aliases: `bench --ssd ...` is `bench ssd ...`, and
    flags alone (or nothing) after `bench` mean the scan bench."""
    from .bench import BENCHES, DEFAULT

    if args and args[0] in BENCHES:
        return args
    old = {b.old_flag: b.name for b in BENCHES.values() if b.old_flag}
    chosen = [a for a in args if a in old]
    if len(chosen) > 1:
        raise ScanExportError(f"bench: {', '.join(old)} each choose what to time; give one of them, "
                              f"got {' '.join(chosen)}")
    if not chosen and any(a in ("-h", "--help") for a in args):
        return args  # `bench --help`: the list of benches
    return [old[chosen[0]] if chosen else DEFAULT, *(a for a in args if a not in old)]


class _BenchParser(_Parser):
    """`bench`: the old spellings become subcommands first, and a flag of another bench is refused
    naming the bench it belongs to."""

    benches: dict  # name -> that bench's parser, filled by _add_bench

    def parse_known_args(self, args=None, namespace=None):
        args = _bench_argv(list(sys.argv[1:] if args is None else args))
        namespace, extras = super().parse_known_args(args, namespace)
        flags = [a.split("=")[0] for a in extras if a.startswith("-")]
        if flags:
            owners = [name for name, p in self.benches.items() if flags[0] in p._option_string_actions]
            belongs = f"an argument of bench {', '.join(owners)}" if owners else "no argument of any bench"
            raise ScanExportError(f"bench {args[0]}: {flags[0]} is {belongs}; expected one of "
                                  f"{', '.join(self.flags_of(args[0]))}, got {' '.join(extras)} "
                                  f"(see {PROG} bench {args[0]} --help)")
        if extras:
            raise ScanExportError(f"bench {args[0]}: expected no positional arguments, got {' '.join(extras)}")
        return namespace, extras

    def flags_of(self, name: str) -> list[str]:
        return [a.option_strings[-1] for a in self.benches[name]._actions if a.option_strings and a.dest != "help"]


def _bench_json_is_ours(path) -> bool:
    import json
    from pathlib import Path

    try:
        return isinstance(d := json.loads(Path(path).read_text()), dict) and d.get("written_by") == PROG
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def cmd_bench(args):
    from .bench import BENCHES
    from .bench.common import write_json
    from .onnx.output_dir import check_output_file

    bench = BENCHES[args.bench]
    if args.json_path is not None:
        check_output_file(args.json_path, ours=_bench_json_is_ours, what="--json", parent_must_exist=True)
    results = bench.run(args)
    print(bench.format(results))
    if args.json_path:
        write_json({"written_by": PROG, **results}, args.json_path)
    return 0


def _add_export_model(sub):
    from .onnx.targets import DEFAULT_SCAN_FORM, DEFAULT_TARGET, SCAN_FORMS, TARGETS

    p = sub.add_parser("export-model", help="export a local or Hub HF checkpoint to ONNX with state I/O",
                       description="export a local HF checkpoint (or a Hub id) of model_type "
                                   f"{', '.join(MODEL_TYPES)} to ONNX with state (and KV-cache) I/O")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT",
                   help="a local Hugging Face checkpoint directory (config.json + weights), or a Hub id ORG/NAME "
                        "(downloaded with huggingface_hub; HF_HOME, HF_HUB_OFFLINE and HF_TOKEN apply)")
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit (default: main)")
    p.add_argument("--out", required=True,
                   help="output directory: new, empty, or a previous export (then only its files are replaced)")
    p.add_argument("--force", action="store_true",
                   help="also write into a non-empty directory that holds no export; only scan-export's own file "
                        "names are replaced, nothing else is touched")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weights and activations")
    p.add_argument("--target", default=DEFAULT_TARGET, choices=sorted(TARGETS),
                   help="runtime to target (sets IR version and opset)")
    p.add_argument("--opset", type=_int_at_least(1), default=None, help="override the target's opset")
    p.add_argument("--lowering", default=None, choices=["portable", "native"],
                   help="Mamba-2 only: portable Loop (opset 21) or native LinearAttention (opset 27, --target "
                        "ort-1.32) (default: portable)")
    p.add_argument("--scan-form", default=None, choices=list(SCAN_FORMS),
                   help="Mamba-1 only: a Scan over time steps (sequential; fastest on CPU) or a Loop over chunks "
                        f"(chunked; parallel within a chunk) (default: {DEFAULT_SCAN_FORM})")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantization of every weight MatMul (and the tied embedding) to onnxruntime's "
                        "MatMulNBits; needs --dtype fp32 (docs/quantization.md)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="with --quantize: weights per quantization block along K, a power of two >= 16 (default: 32)")
    p.add_argument("--accuracy-level", type=nonneg_int, default=None,
                   help="with --quantize: MatMulNBits' activation precision, 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                        "(default: 4, the fast kernels; int8 at 0-3 is refused: ~25x slower)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are drawn on stderr only when it is a terminal)")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args):
    from .contract import read_description
    from .onnx.model_export import export_model
    from .progress import terminal

    from .onnx.quantize import check_quantize_args

    check_quantize_args(args.quantize, args.block_size, args.accuracy_level, args.dtype,  # before any work
                        flags={"quantize": "--quantize", "block_size": "--block-size",
                               "accuracy_level": "--accuracy-level", "dtype": "--dtype"})
    with terminal(enabled=False if args.quiet else None) as progress:
        out = export_model(args.checkpoint_dir, args.out, dtype=args.dtype, target=args.target, opset=args.opset,
                           lowering=args.lowering, scan_form=args.scan_form, force=args.force, revision=args.revision,
                           quantize=args.quantize, block_size=args.block_size, accuracy_level=args.accuracy_level,
                           progress=progress)
    d = read_description(out)  # the file we just wrote, read as every host reads it
    q = d.get("quantization")
    quant = f", int{q['bits']} weights (block {q['block_size']}, accuracy level {q['accuracy_level']})" if q else ""
    print(f"wrote {out}: {d['model_type']}, {d['num_layers']} layers, vocab {d['vocab_size']}, {d['dtype']}{quant}, "
          f"IR {d['ir_version']}, opset {d['opset']}, {d['node_count']} nodes")
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate from an export directory with onnxruntime (no torch)")
    p.add_argument("export_dir", help="a directory written by export-model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, tokenized with the export's tokenizer.json")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 5,6,7")
    p.add_argument("--max-new-tokens", type=_int_at_least(0, MAX_NEW_TOKENS), required=True,
                   help=f"tokens to generate at most, up to {MAX_NEW_TOKENS:,}")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_float_in(0, math.inf, high_open=True), default=None,
                   help="with --do-sample: divide the logits by this (default: 1.0)")
    p.add_argument("--top-k", type=nonneg_int, default=None, help="with --do-sample: keep the k best tokens, 0 = all (default: 0)")
    p.add_argument("--top-p", type=_float_in(0, 1), default=None, help="with --do-sample: nucleus mass in (0, 1] (default: 1.0)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="with --do-sample: random seed (default: fresh entropy)")
    p.add_argument("--stop-token-id", type=nonneg_int, default=None, help="stop after this token (default: the model's eos_token_id)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider; never falls back")
    p.add_argument("--engine", default="ort", choices=["ort", "genai"],
                   help="ort: our loop on onnxruntime; genai: onnxruntime-genai >= 0.18, for comparison "
                        "(exports made with --target genai; prompts of one length)")
    p.add_argument("--json", action="store_true", help='print {"tokens": [...], "text": ...} at the end instead of streaming')
    p.set_defaults(func=cmd_generate)


def generate_options(args) -> dict:
    from .runtime.generate import Sampling

    if not args.do_sample:
        require_flag(args, "--do-sample", {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                                           "seed": "--seed"})
    sampling = Sampling(do_sample=args.do_sample, temperature=1.0 if args.temperature is None else args.temperature,
                        top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)
    return {"sampling": sampling, "stop_token_id": args.stop_token_id}


def parse_input_ids(text: str, vocab_size: int) -> list[int]:
    """'5,6,7' -> [5, 6, 7], each in [0, vocab_size); one line naming --input-ids otherwise."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise ScanExportError(f"--input-ids: expected comma-separated token ids such as 5,6,7, got {text!r}")
    ids = []
    for t in parts:
        try:
            ids.append(int(t))
        except ValueError:
            raise ScanExportError(f"--input-ids: expected comma-separated integers, got {t!r} in {text!r}") from None
        if not 0 <= ids[-1] < vocab_size:
            raise ScanExportError(f"--input-ids: expected token ids in [0, {vocab_size}) (the export's vocab_size), got {t}")
    return ids


def _utf8_text(text: str) -> str:
    """A shell argument as valid text: Python keeps undecodable bytes as lone surrogates, which the
    tokenizer cannot take; one line naming --prompt instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        raise ScanExportError(f"--prompt: expected UTF-8 text, got the byte {raw[e.start:e.start + 1]!r} at byte "
                              f"{len(text[:e.start].encode('utf-8', 'surrogateescape'))} (check the terminal's "
                              f"encoding, or pass --input-ids)") from None
    return text


def cmd_generate(args):
    import json

    from .runtime.streaming import TextStream
    from .runtime.tokenizer import load_tokenizer

    if args.engine == "genai":  # the same interface, run by onnxruntime-genai
        from .runtime.genai import GenaiModel as model_class, generate_genai as generate
    else:
        from .runtime.generate import ExportedModel as model_class, generate
    model = model_class(args.export_dir, args.provider)
    if args.prompt is not None:
        tokenizer = load_tokenizer(args.export_dir, required=True, needed_by="--prompt")
        ids = tokenizer.encode(_utf8_text(args.prompt)).ids
        if not ids:
            raise ScanExportError(f"--prompt {args.prompt!r} encodes to no tokens; expected text giving at least one token")
    else:
        ids = parse_input_ids(args.input_ids, model.vocab_size)
        try:  # ids need no tokenizer; one that is there turns the output into text, a broken one does not stop us
            tokenizer = load_tokenizer(args.export_dir, required=False)
        except ScanExportError as e:
            print(f"{PROG}: note: {_one_line(e)}; printing token ids instead of text", file=sys.stderr)
            tokenizer = None
    opts = generate_options(args)
    if opts["stop_token_id"] is not None and opts["stop_token_id"] >= model.vocab_size:
        raise ScanExportError(f"--stop-token-id: expected a token id in [0, {model.vocab_size}) (the export's "
                              f"vocab_size), got {opts['stop_token_id']}")
    if opts["stop_token_id"] is None:
        opts["stop_token_id"] = model.description.get("eos_token_id")

    # Text streams through incremental detokenization: a token alone can be half a character or
    # lose its leading space; what is printed, joined, is exactly the --json text.
    text_stream = TextStream(tokenizer) if tokenizer is not None else None

    def stream(_row, tok):
        print(text_stream.put(tok) if text_stream else f"{tok} ", end="", flush=True)

    (tokens,) = generate(model, [ids], args.max_new_tokens, on_token=None if args.json else stream, **opts)
    if args.json:
        print(json.dumps({"tokens": tokens, "text": tokenizer.decode(tokens) if tokenizer else None}))
    else:
        print(text_stream.end() if text_stream else "")
    return 0


def _add_verify(sub):
    from .verify import FLOOR, MARGIN

    p = sub.add_parser("verify", help="judge an export against transformers in float64 on its checkpoint")
    p.add_argument("export_dir", help="a directory written by export-model")
    p.add_argument("--checkpoint", required=True, help="the HF checkpoint directory the export was made from")
    p.add_argument("--tokens", type=token_count, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    p.add_argument("--rtol", type=_float_in(0, math.inf, high_open=True), default=None,
                   help="a fixed bar on each output's relative error (max|err| / max|ref|) against "
                        f"transformers float64. Default: {MARGIN:g} x the error transformers itself makes "
                        "in the export's dtype (float32, or float16 for fp16 exports) against float64, "
                        f"at least {FLOOR['float32']:g} (float32) / {FLOOR['float16']:g} (float16); a quantized "
                        "export against transformers on its own dequantized weights (accuracy level 4 run at level 0)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args):
    from .verify import verify_export

    # Each line as soon as it is known (a 130m-shaped model takes minutes), the verdict last.
    report = verify_export(args.export_dir, args.checkpoint, n_tokens=args.tokens, provider=args.provider,
                           rtol=args.rtol, say=lambda line: print(line, flush=True))
    print(report.verdict())
    return 0 if report.passed else 1


def _add_demo(sub):
    p = sub.add_parser("demo", help="tiny Mamba: checkpoint -> export -> onnxruntime generate -> verify")
    p.add_argument("--model-type", default=MODEL_TYPES[0], choices=MODEL_TYPES, help="which family")
    p.add_argument("--workdir", default=None,
                   help="keep the checkpoint and export here: a new or empty directory, or an earlier demo's "
                        "(default: a temporary directory, removed afterwards)")
    p.add_argument("--tokens", type=token_count, default=20, help="greedy tokens to generate")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args):
    from .demo import run_demo

    return 0 if run_demo(args.workdir, args.model_type, args.tokens) else 1


def _add_doctor(sub):
    p = sub.add_parser("doctor", help="report the onnxruntime build and providers, and run check and generate on each")
    p.add_argument("--provider", action="append", choices=["cpu", "cuda"], default=None,
                   help="provider to exercise; repeat for several (default: every one this build has)")
    p.add_argument("--tokens", type=token_count, default=16, help="greedy tokens per generation")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args):
    from .doctor import run_doctor

    return 0 if run_doctor(args.provider, args.tokens, say=lambda line: print(line, flush=True)) else 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].strip("`").replace("`", ""),
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_scan, _add_check, _add_bench, _add_export_model, _add_generate, _add_verify, _add_demo, _add_doctor):
        add(_Subparsers(sub))
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: stated by hand where None/False would say nothing
    useful ("default: the model's eos_token_id"), appended here otherwise."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: {action.default})"


class _Subparsers:
    """add_parser with the default-showing formatter on every subcommand."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        kw.setdefault("description", kw.get("help"))
        return self._sub.add_parser(name, **kw)


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "(no message)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = False  # set once parsing succeeded: a usage mistake stays one line even with --debug
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        return args.func(args)
    except ScanExportError as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help, --version, or SIGTERM/SIGHUP raised by output_dir.signals_raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if code > 128:
            print(f"{PROG}: terminated by signal {code - 128}; nothing was left behind", file=sys.stderr)
        return code
    except BrokenPipeError:  # `scan-export ... | head`: the reader left, which is no error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

"""`rescompile import-torch`, `import-onnx` and `export`: models in from PyTorch and ONNX as a
checkpoint (and the spec they describe), and out to ONNX."""

import os
import pickle
from pathlib import Path

from ..errors import InputError, UsageError, optional_module
from ..fileio import open_regular
from ..resources import check_fits
from .common import add_dtype, add_spec, resolve_spec, write_bytes, write_text
from .eval import add_checkpoint, load_infer


def register(sub) -> None:
    p = sub.add_parser("import-torch", help="a PyTorch ResNet's weights as a checkpoint")
    p.add_argument("file", metavar="FILE.pt", help="a state dict saved with torch.save")
    p.add_argument("--spec", help="the spec the weights must fit (default: inferred)")
    add_import_outputs(p)
    p.set_defaults(func=import_torch)
    p = sub.add_parser("import-onnx", help="an ONNX ResNet's weights as a checkpoint")
    p.add_argument("file", metavar="MODEL.onnx")
    add_import_outputs(p)
    p.set_defaults(func=import_onnx)
    p = sub.add_parser("export", help="a checkpoint's model as ONNX")
    add_spec(p)
    add_checkpoint(p)
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx")
    p.set_defaults(func=export, backend="reference")


def add_import_outputs(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="CKPT.npz")
    p.add_argument("--spec-out", metavar="SPEC.toml", help="write the spec the weights describe")
    p.add_argument("--input", type=int, nargs=2, metavar=("H", "W"),
                   help="image size (weights do not say; default 224 224, or 32 32 for CIFAR)")
    add_dtype(p)


def import_torch(args) -> int:
    torch = optional_module("torch", "import-torch", "torch")
    from ..interop import from_torch
    with open_regular(args.file, "torch.save", InputError) as f:
        check_fits(os.fstat(f.fileno()).st_size, f"{args.file}: its tensors")
        try:  # weights_only: tensors and plain containers, never pickled code
            state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message advises weights_only=False: running the file's code.
            raise InputError(f"{args.file}: holds objects other than tensors and plain "
                             f"containers, which rescompile does not unpickle; save the "
                             f"model's state_dict() instead") from None
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise InputError(f"{args.file}: not a readable torch.save file "
                             f"({str(exc).splitlines()[0][:160] if str(exc) else exc!r})") \
                from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    spec = resolve_spec(args.spec) if args.spec else None
    return _save(args, *from_torch(state, spec=spec, input=args.input))


def import_onnx(args) -> int:
    optional_module("onnx", "import-onnx", "onnx")
    from ..interop import from_onnx
    return _save(args, *from_onnx(args.file, input=args.input))


def _save(args, spec, params) -> int:
    from ..runtime import compile
    exe = compile(spec, mode="infer", backend="reference", dtype=args.dtype)
    exe.load_params(params)
    exe.save(args.output)
    if args.spec_out:
        write_text(args.spec_out, spec.to_toml())
    print(f"{spec.name}: {len(params)} tensors -> {args.output}"
          + (f", spec -> {args.spec_out}" if args.spec_out else ""))
    return 0


def export(args) -> int:
    onnx = optional_module("onnx", "export", "onnx")
    from ..interop import onnx_model
    if Path(args.output).suffix != ".onnx":
        raise UsageError(f"{args.output}: the output must end in .onnx")
    spec, exe, _ = load_infer(args)  # the graph alone: the data record stays behind
    model = onnx_model(spec, exe.params)
    write_bytes(args.output, model.SerializeToString())
    print(f"{spec.name} at step {exe.step} -> {args.output} (ONNX opset "
          f"{model.opset_import[0].version}, checked by onnx {onnx.__version__})")
    return 0

"""`rescompile cache info|clear`: the on-disk cache of generated kernels.

Only what rescompile writes is counted or removed: the CPU micro-kernels' object code
(`objects/*.o`), the CUDA backend's generated modules (`cuda/k_*.py`) and Numba's compiled code
beside them in `cuda/__pycache__`."""

from pathlib import Path

from ..fileio import cache_root

PATTERNS = ("objects/*.o", "cuda/k_*.py", "cuda/__pycache__/*")


def register(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the generated-kernel cache")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--dir", help="cache directory (default: $RESCOMPILE_CACHE_DIR or the "
                                 "user cache dir)")
    p.set_defaults(func=run)


def cache_files(directory: Path) -> list[Path]:
    return [p for pattern in PATTERNS for p in directory.glob(pattern) if p.is_file()]


def run(args) -> int:
    directory = cache_root(args.dir)
    files = cache_files(directory)
    if args.action == "info":
        objects = [p for p in files if p.suffix == ".o"]
        modules = [p for p in files if p.suffix == ".py"]
        size = sum(p.stat().st_size for p in files)
        print(f"cache     {directory}")
        print(f"kernels   {len(objects)} CPU micro-kernels, {len(modules)} CUDA modules")
        print(f"files     {len(files)} ({size / 1e6:.1f} MB, compiled code included)")
        return 0
    for path in files:
        path.unlink(missing_ok=True)
    print(f"cleared   {directory} ({len(files)} files)")
    return 0

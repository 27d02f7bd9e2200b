"""`rescompile cache info|clear`: the on-disk cache of generated kernels.

Only what rescompile wrote is counted or removed: the files listed in the cache's record
(`kernel_cache.RECORD`: the CPU micro-kernels' object code, the CUDA backend's generated modules)
and the code Numba compiled for those modules beside them in `cuda/__pycache__`. Anything
else in the directory is left alone."""

from pathlib import Path

from ..errors import ResourceError
from ..kernel_cache import RECORD, configured_cache_dir, recorded_files


def register(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the generated-kernel cache")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--dir", help="cache directory (default: $RESCOMPILE_CACHE_DIR or the "
                                 "user cache dir)")
    p.set_defaults(func=run)


def cache_files(directory: Path) -> list[Path]:
    files = recorded_files(directory)
    for module in [p for p in files if p.suffix == ".py"]:
        files += sorted((module.parent / "__pycache__").glob(f"{module.stem}.*"))
    return files


def run(args) -> int:
    directory = configured_cache_dir(args.dir)
    if directory.exists() and not directory.is_dir():
        raise ResourceError(f"{directory}: not a directory, so not a kernel cache")
    files = cache_files(directory)
    if args.action == "info":
        objects = [p for p in files if p.suffix == ".o"]
        modules = [p for p in files if p.suffix == ".py"]
        size = sum(p.stat().st_size for p in files)
        print(f"cache     {directory}")
        print(f"kernels   {len(objects)} CPU micro-kernels, {len(modules)} CUDA modules")
        print(f"files     {len(files)} ({size / 1e6:.1f} MB, compiled code included)")
        return 0
    for path in [*files, directory / RECORD]:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ResourceError(f"{path}: cannot remove it ({exc.strerror or exc}); the cache "
                                f"is cleared only in part") from None
    print(f"cleared   {directory} ({len(files)} files)")
    return 0

"""textgen's native module (csrc/int8_step.cpp, csrc/lstm_train.cpp): built once per install, loaded if present.

`make install` (so `make run` and `make test`) and the Docker image build it with
`python -m lm.kernels.native build`: torch's `cpp_extension` compiles the sources against the
installed torch with the system's C++ compiler, about 30 s on 2 cores. The module's name carries a
hash of the sources, the flags and the torch version, so a build left over from another source or
another torch is never loaded. Without a build (no compiler, or `TEXTGEN_NATIVE=false`) lm/decode/
runs the int8 step's loops from Python, bit for bit the same results, only slower and holding the
GIL between ops, and training runs nn.LSTM.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import logging
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "int8_step.cpp", CSRC / "int8_vnni.cpp", CSRC / "lstm_train.cpp")
HEADERS = (CSRC / "int8_vnni.h",)
BUILD_DIR = Path(__file__).resolve().parent / "_build"  # ignored by git; inside the package when installed


# -O3 vectorizes the elementwise loops; x86-64-v3 (AVX2 and FMA, every x86 server CPU since 2013) gives
# them vector rounding and fused multiply-adds, which are otherwise calls into libm per element. The
# separate roundings the source writes must stay separate: no contraction into FMAs by the compiler
# (lstm_train.cpp, which has no bit-exact twin, allows it for itself). -fopenmp makes at::parallel_for
# split its loops over torch's threads; its GOMP calls bind to the OpenMP runtime torch has loaded.
CFLAGS = [
    "-O3",
    "-ffp-contract=off",
    *(["-march=x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else []),
    *(["-fopenmp"] if platform.system() == "Linux" else []),
]


def supported() -> bool:
    """This CPU runs what CFLAGS compile for (torch's own dispatch reports AVX2 or better on such x86)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def module_name() -> str:
    """A hash of what the build depends on (read once: the source does not change under a process)."""
    files = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = files + torch.__version__.encode() + " ".join(CFLAGS).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return f"textgen_native_{digest}"


def module_path() -> Path:
    return BUILD_DIR / f"{module_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the module into BUILD_DIR (ninja skips it when it is up to date) and return its path."""
    from torch.utils.cpp_extension import load as compile_and_load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    compile_and_load(
        name=module_name(),
        sources=[str(source) for source in SOURCES],
        build_directory=str(BUILD_DIR),
        extra_cflags=CFLAGS,
        verbose=verbose,
    )
    for stale in BUILD_DIR.glob("textgen_*.so"):
        if stale != module_path():
            stale.unlink()
    load.cache_clear()
    return module_path()


@functools.cache
def load() -> ModuleType | None:
    """The built module, or None when this install has no build of the current source."""
    path = module_path()
    if not path.exists():
        return None
    if not supported():
        log.warning("this CPU lacks AVX2/FMA, which the native module was compiled for; running without it")
        return None
    spec = importlib.util.spec_from_file_location(module_name(), path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # built against a different libtorch than the one loaded
        log.warning("could not load the native module %s; running without it", path, exc_info=True)
        return None
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm.kernels.native", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "check"], help="build: compile it; check: exit 1 if not built")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            path = build(verbose=args.verbose)
        except Exception as error:  # a missing or failing compiler, or ninja: one line unless --verbose
            if args.verbose:
                raise
            last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
            names = ", ".join(source.name for source in SOURCES)
            print(f"could not build {names}: {last[0]} (--verbose shows the compiler's output)", file=sys.stderr)
            return 1
        print(f"built {path}")
        return 0
    if load() is None:
        print(f"not built: {module_path()} (run `python -m lm.kernels.native build`)", file=sys.stderr)
        return 1
    print(f"built: {module_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

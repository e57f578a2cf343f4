"""llama.cpp's own programs for the benchmarks (llama-bench, llama-quantize, llama-server...),
built from the llama.cpp sources inside the llama-cpp-python 0.3.36 sdist that
tests/vendor.py unpacks into ~/.cache/pocketlm-tests, into ~/.cache/pocketlm-bench/llama-build
(what benchmarks/gguf_scale.py and benchmarks/serve_concurrency.py run).

A CPU Release build with the machine's own instructions (llama.cpp's default GGML_NATIVE),
nothing fetched: no curl, and llama-server's web page left out (its prebuilt assets are
downloaded from the Hugging Face hub by default, which these machines cannot reach; the
server's API does not need them). The compiler runs at the lowest priority on two jobs,
since it shares the cores; the first build takes about 10 minutes on two cores, a later
target only what it adds (llama-server: the server and mtmd sources, ~15 minutes).

    python benchmarks/llama_tools.py llama-server llama-bench   # build what is missing
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOURCE = (
    Path.home()
    / ".cache/pocketlm-tests/unpacked/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
)
BUILD = Path.home() / ".cache" / "pocketlm-bench" / "llama-build"
OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # an empty web page instead of a download
]


def binary(name: str) -> Path:
    """The path of llama.cpp's program `name`, built first if it is missing."""
    path = BUILD / "bin" / name
    if not path.exists():
        build([name])
    return path


def build(targets: list[str], *, jobs: int = 2) -> None:
    if not (SOURCE / "CMakeLists.txt").exists():
        raise SystemExit(f"llama.cpp's sources are missing ({SOURCE}): run tests/vendor.py first")
    log = BUILD.parent / "llama-build.log"
    BUILD.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        for command in (
            ["cmake", "-S", str(SOURCE), "-B", str(BUILD), *OPTIONS],
            ["nice", "-n", "19", "cmake", "--build", str(BUILD), "-j", str(jobs),
             *(a for t in targets for a in ("--target", t))],
        ):  # fmt: skip
            print(f"$ {' '.join(command)}  (log: {log})", file=sys.stderr)
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"building {', '.join(targets)} failed: see {log}")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["llama-server"]:
        print(binary(name))

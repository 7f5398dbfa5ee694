"""Make the GPU proof's wheels small enough to travel: drop files that the proof never loads, recompress with LZMA.

A GPU run carries at most 64 MiB (the working tree and the wheels together), and pyarrow,
bitsandbytes and pandas alone weigh 110 MB as published. What is dropped, and why it is safe:

- bitsandbytes: the CUDA libraries of other CUDA versions than ``--cuda`` (12.8 and 13.0 by default:
  bitsandbytes loads the nearest one of the runtime's major version), and those for ROCm and XPU.
- pyarrow: Arrow Flight and the S3 filesystem (optional components that pyarrow imports only on
  request; datasets reads local files), the C++ tests, headers and Cython sources.

Every other file is kept byte for byte; each wheel's ``RECORD`` loses the dropped files' lines,
so the hashes of what remains still verify. Members are stored with LZMA, which Python's zipfile
(and so pip) reads: a third smaller than deflate for the big shared libraries.

    python3 bench/slim_wheels.py .whl [--cuda 128 --cuda 130]
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import zipfile
from pathlib import Path

DROPPED: dict[str, list[str]] = {
    "bitsandbytes": [
        "bitsandbytes/libbitsandbytes_rocm*",
        "bitsandbytes/libbitsandbytes_xpu*",
    ],
    "pyarrow": [
        "pyarrow/libarrow_flight.so*",
        "pyarrow/libarrow_python_flight.so*",
        "pyarrow/_flight.*",
        "pyarrow/libarrow_s3.so*",
        "pyarrow/_s3fs.*",
        "pyarrow/_pyarrow_cpp_tests*",
        "pyarrow/tests/*",
        "pyarrow/include/*",
        "pyarrow/src/*",
        "pyarrow/*.pyx",
        "pyarrow/*.pxd",
        "pyarrow/includes/*",
    ],
}
_CUDA_LIBRARY = re.compile(r"bitsandbytes/libbitsandbytes_cuda(\d+)\.so$")


def dropped(project: str, name: str, cuda: set[str]) -> bool:
    """Whether the member ``name`` of ``project``'s wheel is left out."""
    if project == "bitsandbytes" and (match := _CUDA_LIBRARY.match(name)):
        return match.group(1) not in cuda
    return any(fnmatch.fnmatch(name, pattern) for pattern in DROPPED.get(project, []))


def slim(wheel: Path, cuda: set[str]) -> tuple[int, int]:
    """Rewrite ``wheel`` in place; return its sizes before and after."""
    before = wheel.stat().st_size
    project = wheel.name.split("-")[0].lower()
    staging = wheel.with_suffix(".slimming")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(staging, "w", zipfile.ZIP_LZMA) as target:
        removed = {i.filename for i in source.infolist() if dropped(project, i.filename, cuda)}
        for info in source.infolist():
            if info.filename in removed:
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in removed).encode()
            info.compress_type = zipfile.ZIP_LZMA
            target.writestr(info, data)
    staging.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the folder of wheels to rewrite in place")
    parser.add_argument(
        "--cuda", action="append", help="bitsandbytes' CUDA libraries to keep, e.g. 128 (default: 128 and 130)"
    )
    args = parser.parse_args()
    cuda = set(args.cuda or ["128", "130"])
    for wheel in sorted(args.folder.glob("*.whl")):
        before, after = slim(wheel, cuda)
        print(f"{wheel.name}: {before / 2**20:.1f} → {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

"""Builds mpstream's C core (``mpstream._mps``) with cffi in API mode.

The cdef is derived from the headers so each stays the one home of its C interface:
preprocessor guards and includes are dropped and each ``#define`` becomes ``#define NAME ...``
(cffi then reads the value from the compiled header).
"""

import pathlib
import re

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def _cdef_from_header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        define = re.match(r"#define\s+(MPS_\w+)\s+\S", line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


MODULES = ["mps_ring", "mps_kernels", "mps_crc32"]

ffibuilder = cffi.FFI()
for module in MODULES:
    ffibuilder.cdef(_cdef_from_header((HERE / f"{module}.h").read_text()))
ffibuilder.set_source(
    "mpstream._mps",
    "\n".join(f'#include "{module}.h"' for module in MODULES),
    sources=[str((HERE / f"{module}.c").relative_to(HERE.parent)) for module in MODULES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""Compile a spec, show what the compiler did to it, and print the micro-kernels (LLVM IR) one
bottleneck unit runs on.

    python examples/inspect_kernels.py [SPEC] [UNIT]
"""

import sys

import rescompile as rc
from rescompile.dump import render

spec = rc.load_spec(sys.argv[1] if len(sys.argv) > 1 else "examples/seed_small.toml")
unit = sys.argv[2] if len(sys.argv) > 2 else "unit_1_1"

exe = rc.compile(spec, mode="infer", backend="cpu")
print(f"# {spec.name}: {len(exe.lowered.stages[0][1].nodes)} nodes as built, "
      f"{len(exe.graph.nodes)} after the passes")
for record in exe.lowered.pass_log:
    print(f"#   pass {record}")
print("# the optimized graph of", unit)
print("\n".join(line for line in render(exe.graph, "text").splitlines() if f"# {unit}/" in line))

print(f"\n# the kernel calls of {unit} and the micro-kernels they use")
print(exe.program.kernel_listing(unit + "/"))

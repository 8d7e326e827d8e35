"""The workloads: Nix expressions built by nix-daemon under this invocation's
salt (so every build really runs), each built at most once per invocation.

Large paths hold real ELF binaries and libraries copied from the host
(``/usr/bin``, ``/usr/lib/x86_64-linux-gnu``, …), not random bytes, so
compression sees what a CI cache sees.  Builders run unsandboxed (Debian's
Nix) with ``PATH = /usr/bin:/bin`` set by each derivation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from benchmarks.harness import Bench, nix_build, nix_lines, nix_output
from tests.integration.test_daemon import dag_expr

__all__ = [
    "Built",
    "big_path",
    "bulk_closure",
    "compile_dag_expr",
    "cpu_builds_expr",
    "dag_expr",
    "many_paths",
    "nar_sizes",
    "small_paths",
]

_LIB = "/usr/lib/x86_64-linux-gnu"


def _c_source(index: int, functions: int) -> str:
    """A small C program, different for every node (so gcc really works)."""
    body = "".join(
        f"static double f{k}(double x) {{ double s = {index}; "
        f"for (int j = 0; j < {k % 7 + 3}; j++) s += x * j / (j + {k + 1}.0); return s; }}\n"
        for k in range(functions)
    )
    calls = " ".join(f"t += f{k}(t);" for k in range(functions))
    return (
        "#include <stdio.h>\n"
        + body
        + f'int main(void) {{ double t = 1; {calls} printf("%f\\n", t); return 0; }}\n'
    )


def compile_dag_expr(count: int, *, salt: str, functions: int = 80) -> str:
    """``count`` derivations that each compile a C program with gcc -O2 (a few
    tenths of a second: a small real build step), each depending on up to
    three earlier ones, as a list so that nix-build builds every one."""
    nodes = []
    for i in range(count):
        deps = sorted({d for d in (i - 1, i // 2, i // 3) if 0 <= d < i})
        refs = " ".join(f"echo ${{n{d}}} >> $out/deps;" for d in deps)
        # The source travels as a JSON string, which is also a Nix string.
        source = json.dumps(_c_source(i, functions)).replace("${", "\\${")
        nodes.append(
            f'n{i} = derivation {{ name = "cc-{salt}-{i}"; system = builtins.currentSystem;'
            f' builder = "/bin/sh"; PATH = "/usr/bin:/bin"; src = {source};'
            ' args = ["-c" "mkdir -p $out/bin; printf %s \\"$src\\" > p.c;'
            f' gcc -O2 -o $out/bin/p p.c; {refs}"]; }};'
        )
    body = "\n  ".join(nodes)
    return f"let\n  {body}\nin [ {' '.join(f'n{i}' for i in range(count))} ]"


@dataclass(frozen=True)
class Part:
    """One output: shell that fills ``$out/data``, and the parts it references."""

    name: str
    fill: str
    refs: tuple[str, ...] = ()


def _lib_share(index: int, of: int) -> str:
    """Every ``of``-th top-level entry of the multiarch lib directory."""
    return (
        f"find {_LIB} -mindepth 1 -maxdepth 1 | sort | awk 'NR % {of} == {index}' "
        "| xargs -d '\\n' cp -r -t $out/data"
    )


_FULL_BULK = (
    Part("lib-a", _lib_share(0, 3)),
    Part("lib-b", _lib_share(1, 3), ("lib-a",)),
    Part("lib-c", _lib_share(2, 3), ("lib-a",)),
    Part("bin", "cp -r /usr/bin $out/data", ("lib-a", "lib-b", "lib-c")),
    Part("gcc", "cp -r /usr/lib/gcc $out/data", ("lib-a",)),
    Part(
        "python",
        "cp -r /usr/lib/python3.11 /usr/lib/python3 /usr/libexec $out/data",
        ("lib-b", "bin"),
    ),
)
_QUICK_BULK = (
    Part("gconv", f"cp -r {_LIB}/gconv $out/data"),
    Part("perl", f"cp -r {_LIB}/perl {_LIB}/perl-base $out/data", ("gconv",)),
    Part("python", "cp -r /usr/lib/python3.11 $out/data", ("perl",)),
    Part("libexec", "cp -r /usr/libexec $out/data", ("python",)),
)
_FULL_BIG = f"cp -r {_LIB} /usr/bin /usr/lib/gcc /usr/libexec /usr/lib/python3.11 $out/data"
_QUICK_BIG = "cp -r /usr/lib/python3.11 /usr/lib/python3 /usr/libexec $out/data"


def _parts_expr(parts: tuple[Part, ...], salt: str) -> str:
    """One derivation per part; each records its references in
    ``$out/nix-support/refs`` so they are real store references."""
    nodes = []
    for p in parts:
        refs = " ".join(f"p-{r}" for r in p.refs)
        nodes.append(
            f'p-{p.name} = derivation {{ name = "bench-{p.name}-{salt}";'
            f' system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";'
            f" refs = [ {refs} ];"
            f" args = [ \"-c\" ''\n      set -e; mkdir -p $out/data $out/nix-support\n"
            f"      {p.fill}\n"
            "      for r in $refs; do echo $r >> $out/nix-support/refs; done\n    '' ]; };"
        )
    body = "\n  ".join(nodes)
    return f"let\n  {body}\nin [ {' '.join(f'p-{p.name}' for p in parts)} ]"


@dataclass(frozen=True)
class Built:
    """A built workload: derivations and outputs in the same order, and the
    NAR size of every path in the outputs' closure."""

    drvs: list[str]
    outputs: list[str]
    closure: dict[str, int]
    build_seconds: float

    @property
    def nar_bytes(self) -> int:
        return sum(self.closure.values())


def nar_sizes(paths: list[str]) -> dict[str, int]:
    """NAR size of every path in the closure of ``paths`` (from the Nix DB)."""
    data = json.loads(nix_output("nix", "path-info", "--json", "--recursive", *paths))
    if isinstance(data, dict):
        return {p: int(v["narSize"]) for p, v in data.items()}
    return {d["path"]: int(d["narSize"]) for d in data}


def _build(bench: Bench, key: str, expr: str) -> Built:
    """Instantiate, then realise: keeps each output beside its derivation."""
    if key in bench.cache:
        built: Built = bench.cache[key]
        return built
    bench.say(f"building workload {key!r}")
    drvs = nix_lines("nix-instantiate", _write(bench, key, expr))
    seconds, outputs = nix_build(expr, bench=bench)
    # Single-output derivations: one output per argument, in argument order.
    ordered = [
        out
        for i in range(0, len(drvs), 1000)
        for out in nix_lines("nix-store", "--query", "--outputs", *drvs[i : i + 1000])
    ]
    if sorted(ordered) != sorted(outputs):
        raise RuntimeError(f"workload {key}: instantiated and built outputs differ")
    built = Built(drvs, ordered, nar_sizes(outputs), seconds)
    bench.say(
        f"workload {key!r}: {len(outputs)} outputs, closure {len(built.closure)} paths, "
        f"{built.nar_bytes / (1 << 20):.0f} MiB NAR, built in {seconds:.1f}s"
    )
    bench.cache[key] = built
    return built


def _write(bench: Bench, key: str, expr: str) -> str:
    path = bench.work / f"{key}.nix"
    path.write_text(expr)
    return str(path)


def bulk_closure(bench: Bench) -> Built:
    """Several paths of real binaries referencing each other: ≥ 1 GiB in
    full mode, about 150 MiB with --quick."""
    parts = _QUICK_BULK if bench.quick else _FULL_BULK
    built = _build(bench, "bulk", _parts_expr(parts, bench.salt))
    if not bench.quick and built.nar_bytes < 1 << 30:
        raise RuntimeError(f"bulk closure is only {built.nar_bytes} bytes; expected ≥ 1 GiB")
    return built


def big_path(bench: Bench) -> Built:
    """One path whose NAR is ≥ 1 GiB (about 150 MiB with --quick)."""
    fill = _QUICK_BIG if bench.quick else _FULL_BIG
    built = _build(bench, "big", _parts_expr((Part("big", fill),), bench.salt))
    if not bench.quick and built.nar_bytes < 1 << 30:
        raise RuntimeError(f"big path is only {built.nar_bytes} bytes; expected ≥ 1 GiB")
    return built


def many_paths(bench: Bench) -> Built:
    """200 independent paths (40 with --quick) of 150 to 400 KiB of real
    libraries: many NARs compressed at once."""
    count = 40 if bench.quick else 200
    parts = tuple(
        Part(
            f"many-{i}",
            f"find {_LIB} -maxdepth 1 -type f -name '*.so*' | sort | awk 'NR % {count} == {i}' "
            f"| xargs cat | head -c {150_000 + 1250 * i * 200 // count} > $out/data/blob",
        )
        for i in range(count)
    )
    return _build(bench, "many", _parts_expr(parts, bench.salt))


def small_tree_expr(count: int, salt: str) -> str:
    """``count`` tiny derivations in a tree: node i references nodes 8i+1…8i+8,
    so node 0's closure is all of them (the list builds every one)."""
    nodes = []
    for i in range(count):
        kids = " ".join(f"n{k}" for k in range(8 * i + 1, min(8 * i + 9, count)))
        nodes.append(
            f'n{i} = derivation {{ name = "bench-small-{salt}-{i}";'
            f' system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";'
            f' kids = [ {kids} ]; args = ["-c" "mkdir $out; echo {i} > $out/id;'
            f' for k in $kids; do echo $k >> $out/refs; done"]; }};'
        )
    body = "\n  ".join(nodes)
    return f"let\n  {body}\nin [ {' '.join(f'n{i}' for i in range(count))} ]"


def small_paths(bench: Bench) -> Built:
    """2000 tiny paths (200 with --quick); ``drvs[0]``'s output closes over all."""
    count = 200 if bench.quick else 2000
    return _build(bench, "small", small_tree_expr(count, bench.salt))


def cpu_builds_expr(count: int, salt: str, megabytes: int = 64) -> str:
    """``count`` independent CPU-bound builds: gzip -1 and sha256 of
    ``megabytes`` MB of the host's binaries (about a second each here)."""
    nodes = [
        f'c{i} = derivation {{ name = "bench-cpu-{salt}-{i}"; system = builtins.currentSystem;'
        f' builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c"'
        f' "cat /usr/bin/* 2>/dev/null | head -c {megabytes}000000 | gzip -1 | sha256sum > $out"];'
        " };"
        for i in range(count)
    ]
    body = "\n  ".join(nodes)
    return f"let\n  {body}\nin [ {' '.join(f'c{i}' for i in range(count))} ]"

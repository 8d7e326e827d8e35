"""Benchmarks for nix-cache-uploader, run by `scripts/bench`.

One invocation starts nix-daemon and SeaweedFS (loopback only), builds its own
workloads with nix-daemon under a fresh salt (real ELF binaries and libraries
copied from the host, a DAG, thousands of tiny paths, one large path), runs the
uploader and the baselines side by side, and prints one markdown table of
medians and ratios (also written to ``benchmarks/results/latest.md``).

One module per measurement, each with ``NAME`` and ``run(bench) -> list[Row]``:
``hook``, ``bulk``, ``small``, ``memory``, ``noop``, ``interference``.
Shared pieces: ``harness`` (services, buckets, timing, processes),
``workloads`` (the Nix expressions), ``baselines`` (the manual's pipelines),
``s3upload`` (the baselines' boto3 upload script), ``table`` and ``machine``.
"""

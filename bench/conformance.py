"""The conformance suite over all of ONNX's backend test data as installed (issue 10).

Every case of ``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}``
and every node case of onnx's own generators (with the Gemm/Conv/ConvTranspose/MatMul ones
also taken with constant weights) goes through ``analyze``, a near-lossless and a lossy
``compress`` and, where it has a weight operator, ``lower --target cpu``
(``tests/conformance.py`` says what is checked). The light-zoo models run one per child
process, so their time and peak resident memory are their own.

Prints: cases per kind, exit codes per command, refusals grouped by reason, crashes,
invalid outputs and mismatches (each listed), and the light models' time and memory.

``python bench/conformance.py [--no-lower] [--only REGEX]``
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conformance  # noqa: E402  (the suite lives beside the tests that run its subset)


def _light(case: conformance.Case, lower: bool) -> dict:
    argv = [sys.executable, str(ROOT / "tests" / "conformance.py"), case.name]
    proc = subprocess.run(argv + (["--lower"] if lower else []), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"case": case.name, "kind": case.kind, "seconds": None, "peak_rss_mb": None,
                "outcomes": [{"command": "harness", "code": 1, "message": proc.stderr[-400:],
                              "problems": [], "seconds": 0.0}]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_process(case: conformance.Case, lower: bool, work: Path) -> dict:
    start = time.perf_counter()
    outcomes = conformance.run_case(case, work, lower=lower)
    return {"case": case.name, "kind": case.kind, "seconds": time.perf_counter() - start,
            "outcomes": [o.__dict__ for o in outcomes]}


def _reason(message: str) -> str:
    """A refusal's sentence with its names, paths and numbers taken out, to group by."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message.removeprefix("qmpass: "))
    text = re.sub(r"/\S+", "…", text)
    text = re.sub(r"\d+", "N", text)
    return text[:110]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-lower", action="store_true", help="skip lower --target cpu")
    parser.add_argument("--only", help="run only cases whose name matches this regex")
    args = parser.parse_args()
    lower = not args.no_lower
    cases = conformance.all_cases()
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]

    results = []
    started = time.perf_counter()
    with conformance.scratch() as work:
        for number, case in enumerate(cases, 1):
            record = _light(case, lower) if case.kind == "light" else \
                _in_process(case, lower, work)
            results.append(record)
            if case.kind == "light" or number % 200 == 0:
                print(f"  [{number}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)

    kinds = collections.Counter(r["kind"] for r in results)
    codes: collections.Counter[tuple[str, int]] = collections.Counter()
    refusals: collections.Counter[tuple[str, str]] = collections.Counter()
    broken: list[str] = []
    for r in results:
        for o in r["outcomes"]:
            codes[(o["command"], o["code"])] += 1
            if o["code"] == 2:
                refusals[(o["command"], _reason(o["message"]))] += 1
            elif o["code"] != 0:
                last = (o["message"].strip().splitlines() or ["?"])[-1]
                broken.append(f"CRASH {r['case']} {o['command']}: {last[:150]}")
            broken += [f"BROKEN {r['case']} {o['command']}: {p}" for p in o["problems"]]

    print(f"conformance over onnx {conformance.onnx.__version__}'s backend test data "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| kind | cases |\n|---|---:|")
    for kind, n in sorted(kinds.items()):
        print(f"| {kind} | {n} |")
    print(f"| all | {len(results)} |\n")
    print("| command | exit 0 | exit 2 | other (crash) |\n|---|---:|---:|---:|")
    for command in sorted({c for c, _ in codes}):
        other = sum(n for (c, code), n in codes.items() if c == command and code not in (0, 2))
        print(f"| {command} | {codes[(command, 0)]} | {codes[(command, 2)]} | {other} |")
    print(f"\ncrashes and broken checks: {len(broken)}")
    for line in broken:
        print("  " + line)
    print("\nrefusals (exit 2) by reason, near-lossless compress:")
    for (command, reason), n in refusals.most_common():
        if command == "compress-near":
            print(f"  {n:5d}  {reason}")
    light = [r for r in results if r["kind"] == "light"]
    if light:
        print("\n| light model | seconds (all commands) | peak RSS (MB) | near | keep 0.5 |")
        print("|---|---:|---:|---|---|")
        for r in light:
            by = {o["command"]: o for o in r["outcomes"]}

            def cell(name: str, by: dict = by) -> str:
                o = by.get(name)
                return "-" if o is None else f"exit {o['code']}, {o['seconds']:.0f} s"

            seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            print(f"| {r['case']} | {seconds} | {rss} | {cell('compress-near')} | "
                  f"{cell('compress-keep')} |")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

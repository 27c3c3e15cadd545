"""Mutation testing of the holder core and the server's audit: how many deliberate breaks do the tests catch?

    pip install mutmut   # not a project dependency: a benchmark tool
    python -m benchmarks.mutation [--out runs/mutation] [--max-children 2]

mutmut changes one thing at a time in the modules below (an operator, a constant, a comparison, a return value)
and runs the tests that cover the changed function; a mutant the tests pass is a "survivor", a break nobody would
notice. The run happens in a temporary copy of the repository, so the working tree is never touched. It prints the
counts per module and the survivors, and writes them to --out/mutation.json.

The modules are the math core and what decides what crosses: keys, morphing, AugConv, secrets, the holder's floor
and the audit. The ClientApp and Holder are left out: the tests that cover them run a federation (seconds each),
which would make a run take hours on 2 cores; they are covered by the end-to-end tests instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATED = ["clients/keys.py", "clients/morphing.py", "clients/augconv.py", "clients/secrets.py", "clients/floor.py",
           "server/audit.py"]
TESTS = ["tests/test_keys.py", "tests/test_morphing.py", "tests/test_augconv.py", "tests/test_properties.py",
         "tests/test_secrets.py", "tests/test_audit.py", "tests/test_file_checks.py"]
STATUS = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>[\w ]+)$")


def copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def configure(target: Path, max_children: int, modules: list[str]) -> None:
    (target / "setup.cfg").write_text(
        "[mutmut]\n"
        f"paths_to_mutate =\n" + "".join(f"    {path}\n" for path in modules)
        + "also_copy =\n    simulation/\n    server/\n    strategies/\n    clients/\n    configs/\n    tests/\n"
        + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {path}\n" for path in TESTS)
        + "pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n"
        + f"max_children = {max_children}\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mutation"))
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--modules", nargs="+", choices=MUTATED, default=MUTATED, metavar="FILE",
                        help="the files to mutate (default: all of " + ", ".join(MUTATED) + ")")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep mutmut's working copy in this folder, so a stopped run resumes where it stopped "
                             "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    if shutil.which("mutmut") is None and not Path(sys.executable).with_name("mutmut").exists():
        print("error: mutmut is not installed; pip install mutmut", file=sys.stderr)
        return 2
    mutmut = str(Path(sys.executable).with_name("mutmut")) if Path(sys.executable).with_name("mutmut").exists() \
        else shutil.which("mutmut")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mple-mutation-") as folder:
        work = args.work or Path(folder)
        if not (work / "setup.cfg").exists():
            work.mkdir(parents=True, exist_ok=True)
            copy_repository(work)
            configure(work, args.max_children, args.modules)
        run = subprocess.run([mutmut, "run", "--max-children", str(args.max_children)], cwd=work, text=True)
        listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, text=True, capture_output=True)
    statuses = {}
    for line in listing.stdout.splitlines():
        match = STATUS.match(line)
        if match:
            statuses[match["name"]] = match["status"].strip()
    if not statuses:
        print(f"error: mutmut reported no mutants (exit {run.returncode}); its output is above",
              file=sys.stderr)
        return 1
    per_module: dict[str, dict[str, int]] = {}
    for name, status in statuses.items():
        module = name.split(".x")[0].split("__mutmut")[0].rsplit(".", 1)[0]
        per_module.setdefault(module, {}).setdefault(status, 0)
        per_module[module][status] += 1
    survivors = sorted(name for name, status in statuses.items() if status == "survived")
    killed = sum(status == "killed" for status in statuses.values())
    figures = {"mutants": len(statuses), "killed": killed, "survived": len(survivors),
               "other": len(statuses) - killed - len(survivors), "per_module": per_module, "survivors": survivors,
               "seconds": round(time.monotonic() - started, 1), "modules": args.modules, "tests": TESTS}
    print(f"{len(statuses)} mutants: {killed} killed, {len(survivors)} survived, {figures['other']} other "
          f"(timeouts, no tests) in {figures['seconds']:.0f} s")
    for module, counts in sorted(per_module.items()):
        print(f"  {module}: " + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
    for name in survivors:
        print(f"  survived: {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"results: {args.out / 'mutation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mutation testing of the modules where a silent bug costs most, with cosmic-ray (scripts/mutation.sh).

For each module of MODULES cosmic-ray makes the mutants (an operator changed, a number moved by one, a
condition negated, a loop that runs zero times, ...), applies them one at a time and runs the fast unit
tests that concern the module; a mutant is killed when they fail (or run past the timeout) and survives
when they pass. The score is killed / (killed + survived).

Nothing is mutated in the checkout: the sources and tests are copied into a workspace
(``$DMOE_MUTATION_DIR``, default ``/tmp/dmoe-mutation``) laid out as the installed package is
(``node/`` as ``dmoe/node``), and the tests run there with the workspace first on ``sys.path``. Other
work in the checkout never sees a mutant, and the mutants never see it.

Each mutant's tests run in a process forked from a server that has imported torch, pytest and the other
heavy dependencies once (``serve``; cosmic-ray's test command is the small ``client`` that asks it): a
fresh interpreter would spend ~3 s of the ~4 s per mutant importing them. The fork has imported nothing
of dmoe, so it imports the mutated sources as a fresh interpreter would.

Mutants that cannot change behaviour by construction are skipped before the run and not counted: those
inside type annotations (every module has ``from __future__ import annotations``, so they are never
evaluated). The operator set leaves out, to keep a run within an hour on two shared cores, the binary
operators' replacements by bitwise and shift operators and the value comparisons' replacements by
``is``/``is not`` (see docs/mutation.md). Where a module is large, only the functions named in MODULES
are mutated.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The installed package's layout: the checkout's node/ and coordinator/ are dmoe.node and dmoe.coordinator.
PACKAGE_DIRS = {"dmoe": "dmoe", "node": "dmoe/node", "coordinator": "dmoe/coordinator"}
TEST_TIMEOUT = 60.0  # seconds for one mutant's tests; a mutant that runs past it is killed (a hang)

EXCLUDED_OPERATORS = [
    # arithmetic replaced by bitwise or shift operators (on floats and tensors: a TypeError at once)
    r"core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift)$",
    # value comparisons replaced by identity comparisons
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
]


@dataclass(frozen=True)
class Module:
    name: str
    files: list[str]  # paths in the checkout
    tests: list[str]
    added: list[str]  # tests written against the survivors of ``tests``
    functions: list[str] = field(default_factory=list)  # qualified names; empty: the whole file
    note: str = ""


T = "tests/unit/"
# Each module's tests: those it had before mutation testing, then those written against their survivors
# (``--before`` runs the first only).
MODULES = [
    Module("uids", ["dmoe/core/uids.py"], [T + "core/test_uids.py"], [T + "core/test_uid_pattern_bounds.py"]),
    Module("guard", ["node/guard.py"], [T + "node/test_guard.py", T + "core/test_auth.py"],
           [T + "node/test_guard_edges.py"]),
    Module("auth", ["dmoe/core/auth.py"], [T + "core/test_auth.py"], [T + "core/test_auth_edges.py"]),
    Module("wire", ["dmoe/core/wire.py", "dmoe/core/compression.py"], [T + "core/test_wire.py"],
           [T + "core/test_wire_edges.py"]),
    Module("backend_checks", ["node/backend.py"],
           [T + "node/test_runtime.py", T + "node/test_backend.py", T + "node/test_request_limits.py"],
           [T + "node/test_backend_checks.py"],
           ["ExpertBackend.set_max_batch_tokens", "ExpertBackend.check_input_shapes",
            "ExpertBackend.check_grad_output_shapes", "ExpertBackend.check_values", "_token_width"],
           "the request checks only: shapes, dtypes, batch size, values"),
    Module("gating", ["dmoe/moe/gating.py"],
           [T + "moe/test_hedge.py", T + "moe/test_beam_vectorised.py", T + "moe/test_gate_noise.py"],
           [T + "moe/test_gating_combine.py"]),
    Module("dispatch_quorum", ["dmoe/client/dispatch.py"],
           [T + "client/test_batched_dispatch.py", T + "client/test_bulk_checks.py"],
           [T + "client/test_dispatch_quorum.py"],
           ["Dispatcher._forward", "_all_finite", "_token_counts", "_checked", "_decoded", "_within",
            "_check_values"],
           "the quorum (Dispatcher._forward) and the checks of answers it applies"),
    Module("pool", ["node/pool.py"], [T + "node/test_pooled_storage.py"], [T + "node/test_pool_edges.py"],
           note="pooled storage of grouped experts: rows, chunks, views, Adam state"),
]


def workspace() -> Path:
    return Path(os.environ.get("DMOE_MUTATION_DIR", "/tmp/dmoe-mutation"))


def in_workspace(path: str) -> str:
    top, _, rest = path.partition("/")
    return f"{PACKAGE_DIRS[top]}/{rest}" if top in PACKAGE_DIRS else path


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


def lay_out(src: Path, tests_only: bool) -> None:
    """The workspace's copy of the package (as installed) and of the tests."""
    src.mkdir(parents=True, exist_ok=True)
    if not tests_only:
        copy_tree(ROOT / "dmoe", src / "dmoe")
        for top, where in PACKAGE_DIRS.items():
            if top != "dmoe":
                copy_tree(ROOT / top, src / where)
        shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    copy_tree(ROOT / "tests", src / "tests")


def digest(module: Module) -> str:
    h = hashlib.sha256()
    for path in module.files:
        h.update((ROOT / path).read_bytes())
    return h.hexdigest()


# --- the test server and its client ------------------------------------------------------------------

def serve(sock_path: str, src: str) -> None:
    """Import the heavy dependencies once, then run each client's pytest in a fork of this process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # no thread pool in the parent across forks
    sys.dont_write_bytecode = True
    os.chdir(src)
    sys.path.insert(0, src)
    import numpy  # noqa: F401
    import pytest
    import torch  # noqa: F401
    for name in ("grpc", "google.protobuf", "hypothesis", "hivemind", "safetensors", "pydantic"):
        try:
            __import__(name)
        except ImportError:
            pass
    assert not any(m == "dmoe" or m.startswith("dmoe.") for m in sys.modules), "the server imported dmoe"
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(_receive(conn))
            log_path = sock_path[:-len(".sock")] + ".log"
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    code = int(pytest.main(request["args"]))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            deadline = time.monotonic() + float(request["timeout"])
            status = None
            while status is None:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                elif time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    status = 124
                else:
                    time.sleep(0.01)
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
            conn.sendall(json.dumps({"code": status, "output": tail}).encode())


def _receive(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


def client(sock_path: str, timeout: float, args: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall(json.dumps({"args": args, "timeout": timeout}).encode() + b"\n")
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    answer = json.loads(reply)
    print(answer["output"])
    if answer["code"] == 124:
        print("timeout")
    return 0 if answer["code"] == 0 else 1


# --- which mutants count -----------------------------------------------------------------------------

def spans(tree: ast.AST, functions: list[str]) -> tuple[list[tuple], list[tuple]]:
    """The annotations' spans in the file, and those of the named functions (nested ones included)."""
    annotations, chosen = [], []

    def span(node):
        return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)

    def visit(node, qualname):
        for child in ast.iter_child_nodes(node):
            name = qualname
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{qualname}.{child.name}" if qualname else child.name
                if name in functions:
                    chosen.append(span(child))
            if isinstance(child, ast.arg) and child.annotation is not None:
                annotations.append(span(child.annotation))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.returns is not None:
                annotations.append(span(child.returns))
            if isinstance(child, ast.AnnAssign):
                annotations.append(span(child.annotation))
            visit(child, name)

    visit(tree, "")
    return annotations, chosen


def inside(pos: tuple[int, int], ranges: list[tuple]) -> bool:
    return any(start <= pos < end for start, end in ranges)


def skip_uncounted(session: Path, module: Module, src: Path, sample: int | None) -> int:
    """Mark as skipped the mutants that are not counted (annotations, operators left out, other functions),
    and with ``sample``, all but that many of the others, drawn at random (the same ones every run)."""
    db = sqlite3.connect(session)
    rows = db.execute("select job_id, module_path, operator_name, start_pos_row, start_pos_col "
                      "from mutation_specs").fetchall()
    # job ids are random: a draw over them would differ from run to run; the mutants' places do not
    where = dict(db.execute("select job_id, module_path || ':' || operator_name || ':' || "
                            "printf('%09d:%09d:%09d', start_pos_row, start_pos_col, occurrence) "
                            "from mutation_specs").fetchall())
    trees = {}
    skipped = []
    excluded = [re.compile(p) for p in EXCLUDED_OPERATORS]
    for job_id, path, operator, row, col in rows:
        if path not in trees:
            trees[path] = spans(ast.parse((src / path).read_text()), module.functions)
        annotations, chosen = trees[path]
        why = None
        if any(p.search(operator) for p in excluded):
            why = "operator left out"
        elif inside((row, col), annotations):
            why = "in a type annotation (never evaluated)"
        elif module.functions and not inside((row, col), chosen):
            why = "outside the functions measured"
        if why:
            skipped.append((job_id, why))
    left = sorted(set(r[0] for r in rows) - {job_id for job_id, _ in skipped}, key=where.__getitem__)
    if sample is not None and len(left) > sample:
        drawn = set(random.Random(module.name).sample(left, sample))
        skipped += [(job_id, "not in the sample") for job_id in left if job_id not in drawn]
    db.executemany("insert or replace into work_results (job_id, worker_outcome, output, test_outcome, diff) "
                   "values (?, 'SKIPPED', ?, null, null)", skipped)
    db.commit()
    db.close()
    return len(skipped)


# --- a run and its report ----------------------------------------------------------------------------

def cosmic(src: Path, *args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "cosmic-ray"), *args], check=True, cwd=src)


def counts(session: Path, src: Path) -> dict:
    db = sqlite3.connect(session)
    rows = db.execute(
        "select w.job_id, lower(r.worker_outcome), lower(r.test_outcome), r.output, r.diff, m.module_path, "
        "m.operator_name, m.start_pos_row from work_items w join mutation_specs m on m.job_id = w.job_id "
        "left join work_results r on r.job_id = w.job_id").fetchall()
    db.close()
    out = {"population": 0, "mutants": 0, "killed": 0, "timeouts": 0, "survived": 0, "incompetent": 0,
           "pending": 0, "skipped": 0, "survivors": []}
    for job_id, worker, test, output, diff, path, operator, row in rows:
        if worker == "skipped":
            out["skipped"] += 1
            out["population"] += output == "not in the sample"
            continue
        out["mutants"] += 1
        if worker is None:
            out["pending"] += 1
        elif test == "survived":
            out["survived"] += 1
            line = (src / path).read_text().splitlines()[row - 1].strip()
            out["survivors"].append({"job_id": job_id, "file": path, "line": row, "operator": operator,
                                     "source": line, "diff": diff})
        elif test == "killed":
            out["killed"] += 1
            out["timeouts"] += (output or "").rstrip().endswith("timeout")
        else:
            out["incompetent"] += 1
    done = out["killed"] + out["survived"]
    out["population"] += out["mutants"]
    out["score"] = round(out["killed"] / done, 3) if done else None
    out["survivors"].sort(key=lambda s: (s["file"], s["line"]))
    return out


def start_server(sock: Path, src: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, __file__, "serve", str(sock), str(src)],
                              stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise SystemExit("the test server did not start")
    return server


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and cosmic-ray too
    chosen = [m for m in MODULES if not args.modules or m.name in args.modules]
    unknown = set(args.modules or []) - {m.name for m in MODULES}
    if unknown:
        raise SystemExit(f"unknown module(s) {sorted(unknown)}; known: {[m.name for m in MODULES]}")
    base = workspace()
    src = base / "src"
    sessions = base / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    lay_out(src, tests_only=args.again and (src / "dmoe").exists())
    sock = base / f"server-{os.getpid()}.sock"
    server = start_server(sock, src)
    results = {}
    try:
        for module in chosen:
            session = sessions / f"{module.name}.sqlite"
            stamp = sessions / f"{module.name}.sha256"
            config = sessions / f"{module.name}.toml"
            pytest_args = ["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                           f"--timeout={TEST_TIMEOUT:.0f}", *module.tests,
                           *([] if args.before else module.added)]
            command = " ".join([sys.executable, __file__, "client", str(sock),
                                str(TEST_TIMEOUT), "--", *pytest_args])
            paths = [in_workspace(f) for f in module.files]  # relative to src, the runs' directory
            config.write_text(
                "[cosmic-ray]\n"
                f"module-path = {json.dumps(paths)}\n"
                f"timeout = {TEST_TIMEOUT + 30}\n"
                "excluded-modules = []\n"
                f"test-command = {json.dumps(command)}\n"
                "[cosmic-ray.distributor]\nname = \"local\"\n")
            again = args.again and session.exists() and stamp.exists() and stamp.read_text() == digest(module)
            if args.again and not again:
                print(f"{module.name}: the sources changed or were never measured: a full run")
                lay_out(src, tests_only=False)
            started = time.monotonic()
            baseline = subprocess.run(command.split(), capture_output=True, text=True)
            if baseline.returncode != 0:
                print(baseline.stdout[-3000:])
                raise SystemExit(f"{module.name}: the tests fail on the unmutated sources")
            if again:
                db = sqlite3.connect(session)
                db.execute("delete from work_results where lower(test_outcome) = 'survived'")
                db.commit()
                db.close()
            else:
                if session.exists():
                    session.unlink()
                cosmic(src, "init", str(config), str(session))
                skip_uncounted(session, module, src, args.sample)
                stamp.write_text(digest(module))
            print(f"{module.name}: {counts(session, src)['pending']} mutants to run", flush=True)
            cosmic(src, "exec", str(config), str(session))
            result = counts(session, src)
            result.update(files=module.files, tests=pytest_args[7:], functions=module.functions,
                          note=module.note, seconds=round(time.monotonic() - started, 1))
            results[module.name] = result
            save(args, {module.name: result})
            print(f"{module.name}: {result['killed']}/{result['mutants']} killed in {result['seconds']} s",
                  flush=True)
    finally:
        server.terminate()
        server.wait()
        for leftover in (sock, sock.with_suffix(".log")):
            leftover.unlink(missing_ok=True)
    table(results)
    print(f"wrote {save(args, results)}")
    return 0


def save(args: argparse.Namespace, results: dict) -> Path:
    """Merge these modules' results into the JSON of the label (the other modules' stay as they were)."""
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"mutation_{args.label}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=1) + "\n")
    return out


def report(args: argparse.Namespace) -> int:
    """The table and JSON of the last run of each module, from its session, without running anything."""
    results = {}
    for module in MODULES:
        session = workspace() / "sessions" / f"{module.name}.sqlite"
        if session.exists() and (not args.modules or module.name in args.modules):
            results[module.name] = counts(session, workspace() / "src")
            results[module.name].update(files=module.files, functions=module.functions, note=module.note,
                                        tests=module.tests + ([] if args.before else module.added))
    table(results)
    print(f"wrote {save(args, results)}")
    return 0


def table(results: dict) -> None:
    print(f"\n{'module':<16} {'of':>5} {'mutants':>7} {'killed':>7} {'timeouts':>8} {'survived':>8} "
          f"{'other':>5} {'score':>6}")
    for name, r in results.items():
        other = r["incompetent"] + r["pending"]
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"{name:<16} {r['population']:>5} {r['mutants']:>7} {r['killed']:>7} {r['timeouts']:>8} "
              f"{r['survived']:>8} {other:>5} {score:>6}")


def survivors(args: argparse.Namespace) -> int:
    src = workspace() / "src"
    for name in args.modules or [m.name for m in MODULES]:
        session = workspace() / "sessions" / f"{name}.sqlite"
        if not session.exists():
            continue
        for s in counts(session, src)["survivors"]:
            print(f"--- {name} {s['file']}:{s['line']} {s['operator']} (job {s['job_id']})")
            print(s["diff"] if args.diff else f"    {s['source']}")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        rest = sys.argv[sys.argv.index("--") + 1:]
        return client(sys.argv[2], float(sys.argv[3]), rest)
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"of {[m.name for m in MODULES]} (default: all)")
    parser.add_argument("--again", action="store_true",
                        help="run the last run's survivors again with the tests as they are now (the sources "
                             "unchanged: a killed mutant stays killed when tests are only added)")
    parser.add_argument("--label", default="latest",
                        help="the results go to benchmarks/results/mutation_LABEL.json")
    parser.add_argument("--out", help="write the JSON here instead")
    parser.add_argument("--sample", type=int,
                        help="run at most this many mutants per module, drawn at random (the same ones every "
                             "run): an estimate of the score where a module has too many to run them all")
    parser.add_argument("--before", action="store_true",
                        help="with the tests each module had before mutation testing only (MODULES)")
    parser.add_argument("--report", action="store_true",
                        help="the table and JSON of the last runs, from their sessions, running nothing")
    parser.add_argument("--survivors", action="store_true", help="list the last run's survivors and stop")
    parser.add_argument("--diff", action="store_true", help="with --survivors: each one's diff")
    args = parser.parse_args()
    if args.survivors:
        return survivors(args)
    return report(args) if args.report else run(args)


if __name__ == "__main__":
    sys.exit(main())

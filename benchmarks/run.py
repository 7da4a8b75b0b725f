"""relaygw against Postfix on this machine: `make bench` (or `.venv/bin/python benchmarks/run.py`).

Options: ``--quick`` (one round, small N: a smoke test), ``--scenarios a,b`` (a subset),
``--rounds N`` (default: 5 for a and b, 1 for the long run g, 3 for the others),
``--output PATH`` (where the report goes; by default a full
run writes benchmarks/RESULTS.md and updates the headline in benchmarks/README.md, while
a quick or partial run only prints), ``--keep`` (keep the scratch directory),
``--relaygw-workers auto|N`` (relaygw's ``[server] workers``; default auto).

See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The benchmark's own modules, and the repository root for tests/support/ (the
# Postfix harness the test suite shares).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from harness import (  # noqa: E402
    HERE,
    REPO,
    SMTP_SINK,
    SMTP_SOURCE,
    expected_workers,
    make_workdir,
    parse_workers,
    raise_nofile,
    stop_all,
    workers_toml,
)
from postfix_relay import postfix_version, unavailable_reason  # noqa: E402
from scenarios import RunResult, Scenario, run, scenarios  # noqa: E402

MIB = 1024

# Targets of the issue.
TARGET_A_E2E = 1.0
TARGET_A_ACCEPT = 1.5
TARGET_B = 1.0
TARGET_E_RSS_MIB = 200
TARGET_E_GREET_MS = 100
TARGET_G_GROWTH_MIB = 10  # "flat": RSS at the end at most this much above RSS at 20 %
COLLAPSE_FLOOR = 0.5  # (f) handled rate / (a) end-to-end rate, per system


class Interrupted(Exception):  # noqa: N818 - a signal, not an error
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(workdir: Path) -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _cmd(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    fs = _cmd(["df", "-T", str(workdir)]).splitlines()[-1:]
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "nproc": _cmd(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "uname": _cmd(["uname", "-a"]),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postfix": postfix_version(),
        "spool_fs": " ".join(fs[0].split()[:2]) if fs else "?",
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _range(values: list[float | None]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if len(vals) > 1 else None


def _rate(s: dict[str, Any], key: str) -> str:
    """Median rate, with the spread over the rounds: "330 (284–341)"."""
    text = _fmt(s.get(key))
    spread = s.get(f"{key}_range")
    return f"{text} ({spread[0]:,.0f}–{spread[1]:,.0f})" if spread else text


def summarize(sc: Scenario, runs: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": sc.key, "title": sc.title, "load": sc.describe()}
    mine = [r for r in runs if r.scenario == sc.key]
    out["failed_runs"] = sum(not r.ok for r in mine)
    if sc.kind == "idle":
        rg = [r.data for r in mine if r.system == "relaygw"]
        out["rss_idle_kib"] = _median([d.get("rss_idle_kib") for d in rg])
        out["rss_peak_kib"] = max((d.get("rss_peak_kib") or 0 for d in rg), default=None)
        out["processes"] = max((d.get("processes") or 0 for d in rg), default=None)
        out["greet_median_ms"] = _median([d.get("greet_median_ms") for d in rg])
        out["greet_max_ms"] = max((d.get("greet_max_ms") or 0 for d in rg), default=None)
        out["idle_open"] = min((d.get("idle_open") or 0 for d in rg), default=0)
        return out
    for system in sc.systems:
        ds = [r.data for r in mine if r.system == system]
        out[system] = {
            "accept": _median([d.get("accept_rate") for d in ds]),
            "e2e": _median([d.get("e2e_rate") for d in ds]),
            "accept_range": _range([d.get("accept_rate") for d in ds]),
            "e2e_range": _range([d.get("e2e_rate") for d in ds]),
            "cpu_ms_per_msg": _median([d["cpu_s"] * 1000 / d["n"] for d in ds
                                       if d.get("cpu_s") is not None and d.get("n")]),
        }
        if system == "relaygw":
            out[system]["reactor_busy"] = _median([d.get("reactor_busy") for d in ds])
            out[system]["workers_busy"] = _median([d.get("workers_busy") for d in ds])
            # Peak RSS: the sum of each process's own VmHWM at the end of the run (an upper
            # bound: the processes need not peak at once); the max of the sampled sums of
            # VmRSS (every 0.25 s, a lower bound) is in the raw runs.
            out[system]["rss_peak_kib"] = max(
                ((d.get("end_status") or {}).get("VmHWM") or 0 for d in ds), default=None)
            out[system]["rss_sampled_max_kib"] = max(
                (d.get("rss_max_sampled_kib") or 0 for d in ds), default=None)
            out[system]["processes"] = max((d.get("processes") or 0 for d in ds),
                                           default=None)
            miles = [d["rss_milestones"] for d in ds if d.get("rss_milestones")]
            if miles:
                out[system]["rss_milestones"] = miles[-1]
    if "relaygw" in out and "postfix" in out:
        for key in ("accept", "e2e"):
            a, b = out["relaygw"][key], out["postfix"][key]
            out[f"ratio_{key}"] = a / b if a and b else None
    return out


def check_targets(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target whose scenario ran."""
    checks: list[tuple[str, str, bool | None]] = []

    def ratio(key: str, which: str, floor: float, label: str) -> None:
        s = summary.get(key)
        if s is None:
            return
        r = s.get(f"ratio_{which}")
        checks.append((f"{label} ≥ {floor:.1f}× Postfix", f"{_fmt(r, 2)}×",
                       None if r is None else r >= floor))

    ratio("a", "e2e", TARGET_A_E2E, "(a) end-to-end")
    ratio("a", "accept", TARGET_A_ACCEPT, "(a) accept rate")
    ratio("b", "e2e", TARGET_B, "(b) end-to-end")
    ratio("b", "accept", TARGET_B, "(b) accept rate")
    e = summary.get("e")
    if e is not None:
        rss = e.get("rss_idle_kib")
        checks.append((f"(e) RSS with {e['load'].split()[0]} idle < {TARGET_E_RSS_MIB} MiB",
                       f"{_fmt(rss and rss / MIB, 1)} MiB",
                       None if rss is None else rss / MIB < TARGET_E_RSS_MIB))
        g = e.get("greet_max_ms")
        checks.append((f"(e) new client greeted within {TARGET_E_GREET_MS} ms (worst probe)",
                       f"{_fmt(g, 1)} ms (median {_fmt(e.get('greet_median_ms'), 1)})",
                       None if g is None else g < TARGET_E_GREET_MS))
    f, a = summary.get("f"), summary.get("a")
    if f is not None and a is not None:
        for system in ("relaygw", "postfix"):
            fr, ar = f.get(system, {}).get("e2e"), a.get(system, {}).get("e2e")
            if fr and ar:
                handled = fr * 2  # N messages handled by the time the good half arrived
                checks.append((f"(f) {system}: handled rate ≥ {COLLAPSE_FLOOR}× its (a) "
                               "end-to-end rate", f"{handled / ar:.2f}× "
                               f"({handled:,.0f} vs {ar:,.0f} msg/s)",
                               handled / ar >= COLLAPSE_FLOOR))
    g = summary.get("g")
    if g is not None:
        miles = g.get("relaygw", {}).get("rss_milestones") or []
        if len(miles) >= 2:
            first = miles[1] if len(miles) > 2 else miles[0]
            growth = (miles[-1][1] - first[1]) / MIB
            checks.append((f"(g) RSS growth from {first[0]:,} to {miles[-1][0]:,} msgs "
                           f"≤ {TARGET_G_GROWTH_MIB} MiB", f"{growth:+.1f} MiB",
                           growth <= TARGET_G_GROWTH_MIB))
    for key, s in summary.items():
        if s.get("failed_runs"):
            checks.append((f"({key}) every run lost nothing and was clean",
                           f"{s['failed_runs']} failed run(s)", False))
    return checks


def table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| scenario | load | relaygw accept | relaygw e2e | Postfix accept | Postfix e2e "
             "| ratio accept | ratio e2e | relaygw CPU ms/msg | Postfix CPU ms/msg "
             "| relaygw reactor busy | relaygw workers busy | relaygw peak RSS (Σ VmHWM) "
             "| relaygw procs |", "|" + "---|" * 14]
    idle = []
    for key, s in summary.items():
        if "greet_median_ms" in s:
            idle.append((key, s))
            continue
        r, p = s.get("relaygw", {}), s.get("postfix", {})
        ratio_a, ratio_e = s.get("ratio_accept"), s.get("ratio_e2e")
        rss = r.get("rss_peak_kib")
        lines.append(
            f"| ({key}) {s['title']} | {s['load']} | {_rate(r, 'accept')} "
            f"| {_rate(r, 'e2e')} | {_rate(p, 'accept')} | {_rate(p, 'e2e')} "
            f"| {_fmt(ratio_a, 2) + '×' if ratio_a else '–'} "
            f"| {_fmt(ratio_e, 2) + '×' if ratio_e else '–'} "
            f"| {_fmt(r.get('cpu_ms_per_msg'), 2)} | {_fmt(p.get('cpu_ms_per_msg'), 2)} "
            f"| {_pct(r.get('reactor_busy'))} | {_pct(r.get('workers_busy'))} "
            f"| {_fmt(rss and rss / MIB, 1)} MiB | {r.get('processes') or '–'} |")
    if idle:
        lines += ["", "| scenario | load | relaygw RSS with all idle (Σ VmRSS) "
                  "| relaygw peak RSS (Σ VmHWM) | relaygw procs "
                  "| new client's greeting, median | worst |", "|" + "---|" * 7]
        for key, s in idle:
            rss, peak = s.get("rss_idle_kib"), s.get("rss_peak_kib")
            lines.append(f"| ({key}) {s['title']} | {s['load']} "
                         f"| {_fmt(rss and rss / MIB, 1)} MiB | {_fmt(peak and peak / MIB, 1)} MiB "
                         f"| {s.get('processes') or '–'} "
                         f"| {_fmt(s.get('greet_median_ms'), 1)} ms "
                         f"| {_fmt(s.get('greet_max_ms'), 1)} ms |")
    return lines


def _pct(x: float | None) -> str:
    return f"{x * 100:.0f} %" if x is not None else "–"


def _mib(kib: int | None) -> str:
    return _fmt(kib / MIB, 1) if kib else "–"


def raw_table(runs: list[RunResult]) -> list[str]:
    lines = ["| run | ok | N | accept s | e2e s | accept msg/s | e2e msg/s | CPU s "
             "| reactor CPU s | workers busy | processes / threads "
             "| relaygw RSS MiB: Σ VmHWM / max sampled Σ VmRSS "
             "| at sink: txn/ids/dups/rcpts | queue left | load avg |", "|" + "---|" * 15]
    idle = ["| run | ok | idle sessions | opened in s | RSS MiB: start / all idle / peak "
            "| processes / threads | greeting probes, ms | idle still open after | load avg |",
            "|" + "---|" * 9]
    for r in runs:
        d = r.data
        ok = "yes" if r.ok else "NO"
        load = f"{d.get('load_before', '')} → {d.get('load_after', '')}"
        if "greet_ms" in d or r.scenario == "e":
            idle.append(
                f"| {r.scenario}/{r.system}/{r.round} | {ok} | {d.get('idle_open', 0):,} "
                f"| {_fmt(d.get('idle_open_s'), 1)} | {_mib(d.get('rss_start_kib'))} / "
                f"{_mib(d.get('rss_idle_kib'))} / {_mib(d.get('rss_peak_kib'))} "
                f"| {d.get('processes', '–')} / {d.get('threads_idle', '–')} "
                f"| {', '.join(f'{x:.1f}' for x in d.get('greet_ms', []))} "
                f"| {d.get('idle_alive_after', '–')} | {load} |")
            continue
        v = d.get("sink") or {}
        lines.append(
            f"| {r.scenario}/{r.system}/{r.round} | {ok} | {d.get('n')} "
            f"| {_fmt(d.get('accept_s'), 2)} | {_fmt(d.get('e2e_s'), 2)} "
            f"| {_fmt(d.get('accept_rate'))} | {_fmt(d.get('e2e_rate'))} "
            f"| {_fmt(d.get('cpu_s'), 1)} | {_fmt(d.get('reactor_cpu_s'), 1)} "
            f"| {_pct(d.get('workers_busy'))} "
            f"| {d.get('processes', '–')} / {d.get('threads_max', '–')} "
            f"| {_mib((d.get('end_status') or {}).get('VmHWM'))} / "
            f"{_mib(d.get('rss_max_sampled_kib'))} "
            f"| {v.get('transactions', '–')}/{v.get('unique', '–')}/{v.get('dups', '–')}/"
            f"{v.get('rcpts', '–')} | {d.get('queued_before_stop', '–')} | {load} |")
    return lines + ([""] + idle if len(idle) > 2 else [])


def report(info: dict[str, str], args: argparse.Namespace, summary: dict[str, dict[str, Any]],
           runs: list[RunResult], checks: list[tuple[str, str, bool | None]],
           wall: float) -> str:
    out = ["# relaygw vs Postfix: benchmark results", "",
           "Written by `benchmarks/run.py` (`make bench`); see `benchmarks/README.md` for the "
           "method.", "", "## Machine and run", ""]
    for key in ("date", "commit", "nproc", "cpu", "memory", "uname", "python", "postfix",
                "spool_fs"):
        out.append(f"- {key}: {info[key]}")
    out.append(f"- rounds: {args.rounds_text} (medians below, with min–max; relaygw and "
               "Postfix alternate, the first one swaps every round)")
    out.append(f"- relaygw workers: {workers_line(args.relaygw_workers)}")
    out.append(f"- relaygw processes seen per run: {processes_line(args.relaygw_workers, runs)}")
    out.append(f"- wall time of the whole run: {wall / 60:.1f} min")
    out += ["", "## Summary (medians, min–max over the rounds in brackets; rates in msg/s)",
            ""]
    out += table(summary)
    out += ["", "accept = N / wall time of smtp-source (every reply 2xx); e2e = messages that "
            "must reach the sink / time until the sink counted the last one; ratio = "
            "relaygw / Postfix. In (f) e2e counts the half that the sink accepts. Every "
            "relaygw figure covers its whole process tree (the main process and all of its "
            "descendants, i.e. the workers): CPU ms/msg is the tree's CPU, or all of the "
            "Postfix instance's processes. Reactor busy: CPU time of relaygw's main "
            "process's main (reactor) thread / e2e time; near 100 % the single reactor "
            "thread is the bottleneck. Workers busy: the same for the busiest worker's main "
            "thread (– without workers). Peak RSS: the sum of every relaygw process's own "
            "VmHWM at the end of the run, the max over the rounds (an upper bound, the "
            "processes need not peak at once; the raw runs also give the max of the sums "
            "of VmRSS sampled every 0.25 s). Procs: relaygw processes seen (main + workers, "
            "max over the run and the rounds).", ""]
    out += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in checks:
        out.append(f"| {name} | {measured} | "
                   f"{'yes' if met else ('no' if met is not None else '?')} |")
    g = summary.get("g", {}).get("relaygw", {}).get("rss_milestones")
    if g:
        out += ["", "## (g) relaygw RSS along the long run", "",
                "| messages at the sink | VmRSS MiB |", "|---|---|"]
        out += [f"| {m:,} | {k / MIB:.1f} |" for m, k in g]
    problems = [(r, p) for r in runs for p in r.problems]
    out += ["", "## Problems seen", ""]
    if problems:
        out += [f"- {r.scenario}/{r.system}/{r.round}: {p}" for r, p in problems]
    else:
        out.append("- none: every accepted message reached the sink exactly once, queues "
                   "ended empty (but for (f)'s deferred half), no error lines in the logs.")
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():
        # Hand-written: the profiles behind the figures (what stands in the way of a
        # missed target), kept beside the numbers they explain.
        out += ["", analysis.read_text().rstrip()]
    out += ["", "## Raw runs", ""]
    out += raw_table(runs)
    out += ["", "<details><summary>All numbers (JSON)</summary>", "", "```json",
            json.dumps([{"scenario": r.scenario, "system": r.system, "round": r.round,
                         "ok": r.ok, "problems": r.problems, **r.data} for r in runs],
                       default=str),
            "```", "", "</details>", ""]
    return "\n".join(out)


def headline(summary: dict[str, dict[str, Any]], info: dict[str, str]) -> str | None:
    a = summary.get("a")
    if not a or not a.get("ratio_e2e"):
        return None
    r, p = a["relaygw"], a["postfix"]
    return (f"Scenario (a), 20 sessions × 2 KiB, {info['nproc']} cores, {info['date'][:10]}, "
            f"commit {info['commit'].split()[0]}, relaygw workers = "
            f"{workers_toml(info['workers'])}: end-to-end relaygw {r['e2e']:,.0f} msg/s vs "
            f"Postfix {info['postfix']} {p['e2e']:,.0f} msg/s = **{a['ratio_e2e']:.2f}×**; "
            f"accept rate {r['accept']:,.0f} vs {p['accept']:,.0f} msg/s = "
            f"**{a['ratio_accept']:.2f}×**.")


def update_readme(line: str) -> None:
    readme = HERE / "README.md"
    try:
        text = readme.read_text()
    except FileNotFoundError:
        return
    new = re.sub(r"(<!-- headline -->\n).*?(\n<!-- /headline -->)",
                 lambda m: m.group(1) + line + m.group(2), text, flags=re.S)
    if new != text:
        readme.write_text(new)


def preflight() -> None:
    problems = []
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            problems.append(f"{tool} missing (Debian package postfix; `make bench` installs it)")
    reason = unavailable_reason()
    if reason:
        problems.append(reason)
    if problems:
        raise SystemExit("benchmark cannot run: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="relaygw vs Postfix benchmark")
    parser.add_argument("--quick", action="store_true", help="one round, small N")
    parser.add_argument("--scenarios", default="", help="comma-separated subset, e.g. a,b")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every scenario but g, which runs once (default: "
                             "a, b 5; others 3; with --quick 1)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the report here (a full run defaults to RESULTS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--relaygw-workers", type=_workers_arg, default="auto",
                        metavar="auto|N",
                        help="relaygw's [server] workers: SMTP session processes beside the "
                             "main one, 0..64, or auto = one per CPU core (default: auto)")
    args = parser.parse_args(argv)
    all_sc = scenarios(args.quick)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()] or list(all_sc)
    unknown = [k for k in keys if k not in all_sc]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(all_sc)}")
    # The long run (g) is one round always; --rounds sets the others; --quick makes it 1.
    rounds = {k: 1 if all_sc[k].rounds == 1 else args.rounds or (1 if args.quick
                                                                  else all_sc[k].rounds)
              for k in keys}
    args.rounds_text = ", ".join(f"{k}: {n}" for k, n in rounds.items())
    full = (not args.quick and keys == list(all_sc)
            and all(n >= min(3, all_sc[k].rounds) for k, n in rounds.items()))
    if any(n < 1 for n in rounds.values()):
        parser.error("--rounds must be at least 1")
    output = args.output or (HERE / "RESULTS.md" if full else None)

    preflight()
    nofile = raise_nofile()
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in stop_signals:
        signal.signal(sig, _on_signal)
    workdir = make_workdir()
    info = machine_info(workdir)
    info["workers"] = args.relaygw_workers
    print(f"relaygw benchmark: scenarios {','.join(keys)}, rounds {args.rounds_text}, "
          f"workdir {workdir}, RLIMIT_NOFILE {nofile}", flush=True)
    print(f"relaygw workers: {workers_line(args.relaygw_workers)}", flush=True)
    print(f"machine: {info['nproc']} cores, {info['cpu']}, Postfix {info['postfix']}, "
          f"commit {info['commit']}", flush=True)
    started = time.monotonic()
    runs: list[RunResult] = []
    interrupted = None
    try:
        for key in keys:
            sc = all_sc[key]
            print(f"\n({key}) {sc.title}: {sc.describe()}", flush=True)
            for rnd in range(1, rounds[key] + 1):
                order = sc.systems if rnd % 2 else tuple(reversed(sc.systems))
                for system in order:
                    t = time.monotonic()
                    res = run(sc, system, rnd, workdir, args.relaygw_workers)
                    runs.append(res)
                    print(f"  round {rnd} {system:8} {_run_line(res)} "
                          f"[{time.monotonic() - t:.0f}s]", flush=True)
                    for p in res.problems:
                        print(f"    ! {p}", flush=True)
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = e.args[0] if e.args else "SIGINT"
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        print(f"\ninterrupted ({interrupted}): stopping everything", flush=True)
    finally:
        for sig in stop_signals:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        for err in stop_all():
            print(f"cleanup: {err}", file=sys.stderr)
        if args.keep or any(not r.ok for r in runs):
            print(f"scratch directory kept: {workdir} (failed runs keep their logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - started
    summary = {k: summarize(all_sc[k], runs) for k in keys if any(r.scenario == k for r in runs)}
    checks = check_targets(summary)
    print("\n" + "\n".join(table(summary)))
    print("\nTargets:")
    for name, measured, met in checks:
        print(f"  [{'ok' if met else ('FAIL' if met is not None else '?')}] {name}: {measured}")
    print(f"\nrelaygw processes seen per run: "
          f"{processes_line(args.relaygw_workers, runs)}")
    print(f"wall time {wall / 60:.1f} min")
    if interrupted:
        return 130
    if output is not None:
        output.write_text(report(info, args, summary, runs, checks, wall))
        print(f"report written to {output}")
        line = headline(summary, info)
        if line and output == HERE / "RESULTS.md":
            update_readme(line)
    else:
        print("(partial or quick run: no report written; use --output PATH to write one)")
    return 0 if all(r.ok for r in runs) else 1


def _workers_arg(value: str) -> int | str:
    try:
        return parse_workers(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'{value!r}: an integer 0..64 or "auto" ({e})') from e


def workers_line(workers: int | str) -> str:
    """What the configuration says and what it means here."""
    n = expected_workers(workers)
    what = "one per CPU core" if workers == "auto" else "as given"
    return (f"`workers = {workers_toml(workers)}` (`--relaygw-workers {workers}`; {what}: "
            f"{n} worker process(es) expected beside the main one)")


def processes_line(workers: int | str, runs: list[RunResult]) -> str:
    """relaygw processes (main + descendants) seen, over the relaygw runs."""
    seen = sorted({r.data["processes"] for r in runs
                   if r.system == "relaygw" and r.data.get("processes")})
    if not seen:
        return "–"
    text = f"{seen[0]}" if len(seen) == 1 else f"{seen[0]}–{seen[-1]}"
    text += " (main + descendants, max over each run)"
    want = expected_workers(workers) + 1
    if seen != [want]:
        text += f"; NOT the expected {want} (the main process and {want - 1} worker(s))"
    return text


def _run_line(res: RunResult) -> str:
    d = res.data
    if "greet_ms" in d or res.scenario == "e":
        return (f"idle {d.get('idle_open', 0):,} RSS {(d.get('rss_idle_kib') or 0) / MIB:.1f} MiB "
                f"procs {d.get('processes', '–')} "
                f"greet median {_fmt(d.get('greet_median_ms'), 1)} ms "
                f"max {_fmt(d.get('greet_max_ms'), 1)} ms {'ok' if res.ok else 'FAILED'}")
    hwm = (d.get("end_status") or {}).get("VmHWM")
    return (f"accept {_fmt(d.get('accept_rate'))} msg/s  e2e {_fmt(d.get('e2e_rate'))} msg/s  "
            f"cpu {_fmt(d.get('cpu_s'), 1)} s"
            + (f"  reactor busy {_pct(d['reactor_busy'])}" if d.get("reactor_busy") else "")
            + (f"  workers busy {_pct(d['workers_busy'])}" if d.get("workers_busy") else "")
            + (f"  peak RSS {hwm / MIB:.1f} MiB" if hwm else "")
            + (f"  procs {d['processes']}" if d.get("processes") else "")
            + ("" if res.ok else "  FAILED"))


if __name__ == "__main__":
    sys.exit(main())

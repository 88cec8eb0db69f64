"""Shared plumbing of the benchmarks: machine tag and facts, peak memory, statistics, JSON results
(one file per machine, one entry per benchmark), the markdown tables in bench/README.md, plots."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

# bench/ of a source checkout (python/spd/bench/common.py -> repo root); else ./bench
_REPO_BENCH = Path(__file__).resolve().parents[3] / "bench"
BENCH_DIR = _REPO_BENCH if _REPO_BENCH.is_dir() else Path.cwd() / "bench"
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"


# -- machine --------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes() -> int:
    """MemAvailable (Linux) or total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int((_mem_total_gib() or 8) * 2**30)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def machine_tag(device: torch.device | str | None = None) -> str:
    """``cpu-<n>c-<arch>`` or ``cuda-<gpu name>``: the results file name."""
    device = resolve_device(str(device) if device is not None else None)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}c-{platform.machine().lower()}"


def machine_info(device: torch.device | str | None = None) -> dict:
    device = resolve_device(str(device) if device is not None else None)
    info = {"tag": machine_tag(device), "device": str(device), "hostname": platform.node(),
            "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_gib": _mem_total_gib()}
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for dist in ("transformers", "numpy", "cupy-cuda13x", "cupy-cuda12x", "spd"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import spd_ext

        info = spd_ext.build_info()
        out["spd_ext"] = {k: info.get(k) for k in ("version", "loaded", "cuda", "build_system", "error")}
    except Exception as exc:  # pragma: no cover - broken install
        out["spd_ext"] = {"error": repr(exc)}
    return out


# -- measurement helpers --------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summary(values) -> dict:
    """median, p25, p75, iqr, min, max, n of a sample."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {"median": statistics.median(vals), "p25": q1, "p75": q3, "iqr": q3 - q1,
            "min": vals[0], "max": vals[-1], "n": len(vals)}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block above its start: CUDA max_memory_allocated, or on CPU the resident set
    high-water mark (VmHWM, reset through /proc/self/clear_refs; falls back to ru_maxrss, which
    is only meaningful in a fresh process)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = None
        self.method = None

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (Linux >= 4.0)
            self._base = _status_kib("VmRSS") * 1024
            self.method = "VmHWM (reset)"
        except (OSError, TypeError):
            import resource

            self._base = _status_kib("VmRSS") * 1024 if _status_kib("VmRSS") else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _status_kib("VmHWM") * 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._base)


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t


# -- results --------------------------------------------------------------------------------------
def results_path(device=None) -> Path:
    return RESULTS_DIR / f"{machine_tag(device)}.json"


def write_results(name: str, entry: dict, *, device=None, out: str | Path | None = None,
                  command: list[str] | None = None) -> tuple[Path, dict]:
    """Merge ``entry`` (config, rows, notes, ...) as benchmark ``name`` into the results file
    (``out`` or bench/results/<machine-tag>.json) and return (path, the whole document)."""
    path = Path(out) if out else results_path(device)
    doc = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        doc = {}
    doc.update(schema=SCHEMA, machine=machine_info(device), versions=versions())
    entry = {"benchmark": name, "command": command or [Path(sys.argv[0]).name, *sys.argv[1:]],
             "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **entry}
    entry = _merge_rows(name, doc.get("benchmarks", {}).get(name), entry)
    doc.setdefault("benchmarks", {})[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path, doc


SCHEMA = "spd-bench/1"

# What identifies one measurement in each benchmark's rows: a later run replaces the rows it
# measured again and keeps the others (so `--models X` or `--rows 1e6` adds to the record).
ROW_KEYS = {"hooks": ("model", "batch", "backend"), "capture": ("method",), "svd": ("M", "d", "r", "method"),
            "train": ("model", "source", "variant")}


def _merge_rows(name: str, old: dict | None, new: dict) -> dict:
    """``new`` plus the rows of ``old`` that it did not measure again (same quick/tiny mode only);
    the commands of the kept rows go to ``earlier_commands``."""
    keys = ROW_KEYS.get(name)
    if not keys or not isinstance(old, dict) or not old.get("rows"):
        return new
    if bool(old.get("quick")) != bool(new.get("quick")) or bool(old.get("tiny")) != bool(new.get("tiny")):
        return new

    def key(row):
        return tuple(row.get(k) for k in keys)

    measured = {key(row) for row in new.get("rows", [])}
    kept = [row for row in old["rows"] if key(row) not in measured]
    if not kept:
        return new
    remeasured = {str(s.get("what")) for s in new.get("skipped", [])}
    merged = dict(new)
    # stable sort on the first key only (model / M): each group keeps its measured order
    merged["rows"] = sorted(kept + list(new.get("rows", [])), key=lambda r: _order(r.get(keys[0])))
    merged["skipped"] = list(new.get("skipped", [])) + [s for s in old.get("skipped", [])
                                                          if str(s.get("what")) not in remeasured]
    merged["earlier_commands"] = [*old.get("earlier_commands", []), {"command": old.get("command"),
                                                                      "created": old.get("created")}]
    return merged


def _order(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _jsonable(obj):
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """``columns``: (header, row key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), spec) for _, k, spec in columns) + " |")
    return "\n".join(lines)


def refresh_readme(name: str, tag: str, text: str, readme: str | Path | None = None) -> Path:
    """Replace (or append) the block ``<!-- bench:NAME:TAG -->`` ... ``<!-- /bench:NAME:TAG -->``."""
    path = Path(readme) if readme else README
    body = path.read_text() if path.is_file() else "# Benchmarks\n"
    start, end = f"<!-- bench:{name}:{tag} -->", f"<!-- /bench:{name}:{tag} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(body):
        body = pattern.sub(lambda _: block, body)
    else:
        anchor = f"<!-- bench:{name} results -->"
        if anchor in body:
            body = body.replace(anchor, anchor + "\n\n" + block, 1)
        else:
            body = body.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def header(doc: dict, name: str) -> str:
    m, entry = doc["machine"], doc["benchmarks"][name]
    quick = " (--quick)" if entry.get("quick") else ""
    return (f"**{m['tag']}**{quick}: {m['cpu']}, {m['cpu_count']} CPUs"
            + (f", {m['gpu']}" if m.get("gpu") else "")
            + f"; torch {doc['versions']['torch']}; {entry['created']}; `{' '.join(entry['command'])}`"
            + "".join(f"; rows kept from {e['created']}: `{' '.join(e['command'] or [])}`"
                      for e in entry.get("earlier_commands", [])))


def results_table(doc: dict, name: str, columns: list[tuple[str, str, str]], note: str = "") -> str:
    """A benchmark's markdown block: header line, the table, an optional note, the skipped sizes."""
    entry = doc["benchmarks"][name]
    text = header(doc, name) + "\n\n" + markdown_table(columns, entry["rows"])
    if note:
        text += "\n\n" + note
    skipped = entry.get("skipped", [])
    if skipped:
        text += "\n\n" + "\n".join(f"- skipped {s['what']}: {s['reason']}" for s in skipped)
    return text


def pyplot():
    """matplotlib's pyplot on the Agg backend (a one-line error when matplotlib is missing)."""
    from ..report import _pyplot

    return _pyplot()


def plot_path(results: Path, name: str) -> Path:
    return results.with_name(f"{results.stem}-{name}.png")

"""Workspace status: stages done, counts, artifact locations, errors."""

from __future__ import annotations

from collections import Counter

from streamprune import leases, storage
from streamprune.errors import StreamPruneError
from streamprune.workspace import STAGES, Workspace, dependency_order, missing_input, pipeline_order


def status(workspace: str | Workspace, storage_options: dict | None = None) -> dict:
    """Summary of a workspace as a JSON-able dict (keys: n_samples, n_shards, stages, errors, ...)."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    if not storage.exists(ws.url, ws.storage_options):
        raise StreamPruneError(f"status: no workspace at {ws.url} (nothing has run there; check -w)")
    meta = ws.read_json("streamprune.json") or {}
    stages: dict[str, dict] = {}
    markers = ws.markers()
    missing: list[str] = []  # inputs whose marker is gone while results made from them remain
    for name in dependency_order(markers):
        m = markers[name]
        stale = ws.outdated_line(name, markers)
        found = ws.outdated(name, markers) if stale else None
        if found and missing_input(found[1], markers) and found[1] not in missing:
            missing.append(found[1])
        stages[name] = {"done": stale is None, "stale": stale, "stage": m.get("stage"), "counts": m.get("counts", {}),
                             "wall_s": m.get("timings", {}).get("wall_s"), "outputs": {
                                 k: ws.path(v) for k, v in m.get("outputs", {}).items()},
                             "finished": m.get("finished")}
    running, interrupted = _runs(ws, markers)
    cat = stages.get("catalog", {}).get("counts", {})
    errors = ws.errors()
    by_stage = Counter(e.get("stage_key", e.get("stage", "?")) for e in errors)
    return {
        "workspace": ws.url,
        "version": meta.get("version"),
        "n_samples": cat.get("n_samples"),
        "n_shards": cat.get("n_shards"),
        "stages": stages,
        "running": running,
        "interrupted": interrupted,
        "pending": sorted({*missing, *(s for s in STAGES if s not in {v.get("stage") for v in stages.values()})}
                          - set(running) - set(interrupted), key=pipeline_order),
        "errors": {"total": len(errors), "by_stage": dict(by_stage), "file": ws.path("errors.jsonl")},
    }


def _runs(ws: Workspace, markers: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """Stages a run is working on now, and stages a run left unfinished (killed, or failed): key -> what
    is known of it (its lease's holder, the chunks it recorded)."""
    running, stopped = {}, {}
    names = storage.listdir(ws.path("_stages"), ws.storage_options)
    leased = {n[:-len(".lease")] for n in names  # not shared.lease, nor a lease being written (.tmp-...)
              if n.endswith(".lease") and n != "shared.lease" and not n.startswith(".")}
    records = {n for n in names if not n.endswith((".json", ".lease")) and not n.startswith(".")}
    for key in sorted(leased | records, key=pipeline_order):
        done_fp = str((markers.get(key) or {}).get("fingerprint", ""))[:16]  # a commit's records, not yet removed
        fps = [fp for fp in storage.listdir(ws.path("_stages", key), ws.storage_options) if fp != done_fp]
        n = sum(len(storage.listdir(ws.path("_stages", key, fp, "chunks"), ws.storage_options)) for fp in fps)
        chunks = f"{n} chunk{'s' if n != 1 else ''} recorded"
        info = leases.read(ws.path("_stages", f"{key}.lease"), ws.storage_options) if key in leased else None
        if info is not None and not leases.is_stale(info):
            running[key] = f"{leases.describe(info)}; {chunks}"
        elif fps or (info is not None and key not in markers):  # not a lease left behind by a commit
            stopped[key] = chunks + (f" by {leases.describe(info)}" if info is not None else "")
    return running, stopped


def format_status(info: dict) -> str:
    """Human-readable status lines."""
    lines = [f"workspace  {info['workspace']}  (streamprune {info.get('version') or '-'})",
             f"samples    {info.get('n_samples') if info.get('n_samples') is not None else '-'} in "
             f"{info.get('n_shards') if info.get('n_shards') is not None else '-'} shards"]
    width = max([24, *map(len, info["stages"])])  # a long name (extrapolate-du-label-aware) widens the column
    pad = " " * (11 + width)
    for name, st in info["stages"].items():
        # short values only: a long one (the GCN's per-epoch training history) is in `status --json`
        counts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"  # 4 digits: 0.205, not 0.20497218...
                           for k, v in st["counts"].items() if len(str(v)) <= 80)
        state = "stale" if st.get("stale") else "done"
        lines.append(f"  {state:<8} {name:<{width}} {st['wall_s'] or 0:8.1f}s  {counts}")
        if st.get("stale"):
            lines.append(f"{pad} {st['stale']}")
        for label, url in st["outputs"].items():
            lines.append(f"{pad} {label}: {url}")
    for name, holder in info.get("running", {}).items():
        lines.append(f"  running  {name:<{width}} {holder}")
    for name, holder in info.get("interrupted", {}).items():
        lines.append(f"  stopped  {name:<{width}} {holder}; its next run resumes it")
    for name in info["pending"]:
        lines.append(f"  pending  {name}")
    err = info["errors"]
    lines.append(f"errors     {err['total']}" + (f" ({err['file']})" if err["total"] else ""))
    return "\n".join(lines)

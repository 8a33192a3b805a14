"""`streamprune run`: every stage in order, each skipped when its marker matches, resumed when partial.

Options come from a TOML file (one table per stage) overridden by command-line values::

    [subset]    fraction = 0.2, seed = 0
    [score]     scores = ["du"], epochs = 30, model = "cnn", full = false
    [embed]     dtype = "float32"
    [index]     k = 20, factory = "auto"
    [extrapolate] methods = ["knn", "gcn"]
    [prune]     source = "knn", strategy = "hard", keep_fraction = 0.7
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field

from streamprune.errors import StreamPruneError
from streamprune.shards import DEFAULT_MAX_MEMBER_BYTES
from streamprune.workspace import Workspace, train_key

ORDER = ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune")

DEFAULTS: dict[str, dict] = {
    "catalog": {"on_error": None, "max_member_bytes": DEFAULT_MAX_MEMBER_BYTES},
    "subset": {"fraction": 0.2, "seed": 0},
    "score": {"scores": ["du"], "epochs": 30, "model": "cnn", "model_kwargs": {}, "batch_size": 128,
              "optimizer": "sgd", "lr": None, "weight_decay": 5e-4, "seed": 0, "augment": "none", "dynamics": "eval",
              "labels": "supervised", "adversarial": None, "pgd_steps": 5, "pgd_step_size": None, "num_classes": None,
              "device": "auto", "window": 10, "decay": 0.9, "full": False, "full_runs": 1, "label_key": "cls",
              "input": "auto", "image_size": None, "cache_memory": None, "checkpoint_every": 30.0},
    "embed": {"encoder": "subset", "dtype": "float32", "batch_size": 256, "chunk_rows": None, "normalize": False,
              "memory_limit": None},
    "index": {"k": 20, "factory": "auto", "nprobe": None, "refine": None},
    "extrapolate": {"methods": ["knn"], "knn_k": "auto", "gcn_epochs": 25, "gcn_k": 10, "gcn_prior": "knn",
                    "propagate_tol": 1e-3, "propagate_max_iter": 50, "kernel_bandwidth": "auto"},
    "prune": {"source": None, "strategy": "hard", "keep_fraction": 0.7, "name": None, "reshard": None},
}


@dataclass
class RunConfig:
    """Per-stage options of a pipeline run (after TOML and CLI overrides)."""

    stages: dict[str, dict] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULTS.items()})
    scheduler: str | None = "local"
    on_error: str = "fail"
    force: bool = False

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, dict] | None = None, **top) -> "RunConfig":
        """Defaults, then the TOML file, then command-line overrides (None values ignored)."""
        cfg = cls(**{k: v for k, v in top.items() if v is not None})
        if path:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise StreamPruneError(f"--config {path}: {exc}") from None
            for stage, opts in data.items():
                if stage in ("scheduler", "on_error"):
                    setattr(cfg, stage, opts)
                    continue
                if stage not in DEFAULTS or not isinstance(opts, dict):
                    raise StreamPruneError(f"--config {path}: unknown table [{stage}] (stages: {', '.join(DEFAULTS)})")
                unknown = set(opts) - set(DEFAULTS[stage])
                if unknown:
                    raise StreamPruneError(f"--config {path}: [{stage}] has unknown option(s) {', '.join(sorted(unknown))}")
                cfg.stages[stage].update(opts)
        for stage, opts in (overrides or {}).items():
            cfg.stages[stage].update({k: v for k, v in opts.items() if v is not None})
        return cfg


def graphs_for(methods: list[str], gcn_prior: str = "knn") -> str:
    """The ``build_index`` graph(s) the extrapolation methods read: "seeds", "all" or "both"."""
    graphs = set()
    for m in methods:
        graphs.add("seeds" if m in ("knn", "kernel") else "all")
        if m == "gcn" and gcn_prior == "knn":
            graphs.add("seeds")  # the GCN's kNN prior
    return "both" if len(graphs) == 2 else (graphs.pop() if graphs else "seeds")


def run_pipeline(shards: list[str], workspace: str, cfg: RunConfig, *, until: str = "prune",
                 storage_options: dict | None = None, echo=print) -> dict:
    """Run catalog → … → ``until``; returns per-stage timings and the outputs a user needs.

    Stages on the "local" scheduler share one local dask cluster
    (:func:`~streamprune.compute.shared_local_cluster`), started by the first stage that needs it.
    """
    from streamprune.compute import shared_local_cluster

    if until not in ORDER:
        raise StreamPruneError(f"--until must be one of {', '.join(ORDER)}")
    with shared_local_cluster():  # starts nothing unless a stage asks for a local cluster
        return _run_stages(shards, workspace, cfg, until, storage_options, echo)


def _run_stages(shards: list[str], workspace: str, cfg: RunConfig, until: str, storage_options: dict | None,
                echo) -> dict:
    from streamprune.decode import DecodeConfig
    from streamprune.compute import parse_memory

    ws = Workspace(workspace, storage_options)
    s = cfg.stages
    sched, on_error, force = cfg.scheduler, cfg.on_error, cfg.force
    cache_memory = parse_memory(s["score"]["cache_memory"], "score.cache_memory")  # checked before any stage
    if not isinstance(s["score"]["full_runs"], int) or s["score"]["full_runs"] < 1:
        raise StreamPruneError(f"score.full_runs must be a whole number of at least 1, not {s['score']['full_runs']!r}")
    if s["score"]["full_runs"] > 1 and not s["score"]["full"]:
        raise StreamPruneError("score.full_runs needs score.full (--full): replicas are full-data runs")
    timings: list[tuple[str, float, bool]] = []
    outputs: dict = {}

    def stage(name: str, fn):
        t0 = time.time()
        result = fn()
        if isinstance(result, list):
            results = result
        elif isinstance(result, dict) and "fingerprint" not in result and "skipped" not in result:
            results = list(result.values())  # several markers by name (index: seeds and all)
        else:
            results = [result]
        skipped = all(r.get("skipped") for r in results if isinstance(r, dict))
        timings.append((name, time.time() - t0, skipped))
        echo(f"{name:<22} {'skipped (done)' if skipped else 'done'} in {time.time() - t0:.1f}s")
        return result

    from streamprune.shards import catalog

    stage("catalog", lambda: catalog(shards, ws, on_error=s["catalog"]["on_error"] or on_error, scheduler=sched,
                                     force=force, max_member_bytes=s["catalog"]["max_member_bytes"]))
    if until == "catalog":
        return _finish(timings, outputs, echo)
    from streamprune.subset import subset

    stage("subset", lambda: subset(ws, fraction=s["subset"]["fraction"], seed=s["subset"]["seed"], force=force))
    if until == "subset":
        return _finish(timings, outputs, echo)

    from streamprune.scoring import compute_scores
    from streamprune.train import TrainConfig, train

    sc = s["score"]
    tcfg = TrainConfig(**{k: sc[k] for k in ("model", "model_kwargs", "epochs", "batch_size", "optimizer", "lr",
                                             "weight_decay", "seed", "augment", "dynamics", "labels", "adversarial",
                                             "pgd_steps", "pgd_step_size", "num_classes", "device")},
                       checkpoint_seconds=float(sc["checkpoint_every"]),
                       **({"memory_budget": cache_memory} if cache_memory is not None else {}))
    decode = DecodeConfig(input=sc["input"], label_key=sc["label_key"], image_size=sc["image_size"])
    params = {"window": sc["window"], "decay": sc["decay"]}
    runs = [(False, 0)] + ([(True, r) for r in range(int(sc["full_runs"]))] if sc["full"] else [])
    for full, replica in runs:
        tag = train_key(full, replica)[len("train"):]  # "", "-full", "-full-r<N>"
        stage(f"train{tag}", lambda: train(ws, tcfg, decode, full=full, replica=replica, on_error=on_error,
                                           scheduler=sched, force=force))
        stage(f"score{tag}", lambda: compute_scores(ws, list(sc["scores"]), full=full, replica=replica,
                                                    params=params, force=force))
    if until == "score":
        return _finish(timings, outputs, echo)

    from streamprune.embed import embed

    e = s["embed"]
    stage("embed", lambda: embed(ws, encoder=e["encoder"], dtype=e["dtype"], batch_size=e["batch_size"],
                                 chunk_rows=e["chunk_rows"], normalize=e["normalize"], on_error=on_error,
                                 scheduler=sched, force=force, memory_limit=e["memory_limit"]))
    if until == "embed":
        return _finish(timings, outputs, echo)

    from streamprune.index import build_index

    methods = list(s["extrapolate"]["methods"])
    graph = graphs_for(methods, s["extrapolate"]["gcn_prior"])
    ix = s["index"]
    idx = stage("index", lambda: build_index(ws, graph=graph, k=ix["k"], factory=ix["factory"], nprobe=ix["nprobe"],
                                             refine=ix["refine"], scheduler=sched, force=force))
    outputs["index"] = idx
    if until == "index":
        return _finish(timings, outputs, echo)

    from streamprune.extrapolate import extrapolate

    x = s["extrapolate"]
    for score_name in sc["scores"]:
        for m in methods:
            opts = {"knn": {"k": x["knn_k"]},
                    "gcn": {"epochs": x["gcn_epochs"], "k": x["gcn_k"], "prior": x["gcn_prior"]},
                    "propagate": {"tol": x["propagate_tol"], "max_iter": x["propagate_max_iter"]},
                    "kernel": {"bandwidth": x["kernel_bandwidth"]}}.get(m, {})
            stage(f"extrapolate {score_name}-{m}",
                  lambda: extrapolate(ws, score_name, m, force=force, scheduler=sched, **opts))
    if until == "extrapolate":
        return _finish(timings, outputs, echo)

    from streamprune.prune import prune

    p = s["prune"]
    source = p["source"] or methods[-1]
    pm = stage("prune", lambda: prune(ws, score=sc["scores"][0], source=source, strategy=p["strategy"],
                                      keep_fraction=p["keep_fraction"], name=p["name"], reshard=p["reshard"],
                                      scheduler=sched, force=force))
    outputs["prune"] = pm
    return _finish(timings, outputs, echo)


def _finish(timings: list, outputs: dict, echo) -> dict:
    total = sum(t for _, t, _ in timings)
    echo("")
    echo(f"{'stage':<28}{'wall s':>10}  status")
    for name, t, skipped in timings:
        echo(f"{name:<28}{t:>10.1f}  {'skipped' if skipped else 'ran'}")
    echo(f"{'total':<28}{total:>10.1f}")
    if all(skipped for _, _, skipped in timings):
        echo("nothing to do: every stage was already done with this configuration")
    return {"timings": [{"stage": n, "wall_s": round(t, 3), "skipped": sk} for n, t, sk in timings],
            "outputs": outputs}

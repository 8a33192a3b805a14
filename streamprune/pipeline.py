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

from streamprune.errors import StreamPruneError, check_optional_whole, check_seed, check_whole, whole
from streamprune.shards import DEFAULT_MAX_MEMBER_BYTES
from streamprune.workspace import Workspace, train_key

ORDER = ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune")

DEFAULTS: dict[str, dict] = {
    "catalog": {"on_error": None, "max_member_bytes": DEFAULT_MAX_MEMBER_BYTES},
    "subset": {"fraction": 0.2, "seed": 0},
    "score": {"scores": ["du"], "epochs": 30, "model": "cnn", "model_kwargs": {}, "batch_size": 128,
              "optimizer": "sgd", "lr": None, "weight_decay": 5e-4, "seed": 0, "augment": "none", "dynamics": "eval",
              "labels": "supervised", "adversarial": None, "pgd_steps": 5, "pgd_step_size": None, "num_classes": None,
              "device": "auto", "window": 10, "decay": 0.9, "el2n_epochs": None, "full": False, "full_runs": 1,
              "label_key": "cls", "input": "auto", "image_size": None, "image_mode": "auto", "cache_memory": None,
              "checkpoint_every": 30.0},
    "embed": {"encoder": "subset", "dtype": "float32", "batch_size": 256, "chunk_rows": None, "normalize": False,
              "memory_limit": None},
    "index": {"k": 20, "factory": "auto", "nprobe": None, "refine": None},
    "extrapolate": {"methods": ["knn"], "knn_k": "auto", "gcn_epochs": 25, "gcn_k": 10, "gcn_prior": "knn",
                    "gcn_patience": 10,
                    "propagate_tol": 1e-3, "propagate_max_iter": 50, "kernel_bandwidth": "auto"},
    "prune": {"score": None, "source": None, "strategy": "hard", "keep_fraction": 0.7, "name": None, "seed": 0,
              "noise_fraction": None, "reshard": None, "shard_size": None, "max_count": None},
}


# the expected type of every option, where its default does not say it (None) or says too little
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "catalog.on_error": ((str,), "a string"),
    "score.scores": ((list,), "a list of score names"),
    "score.lr": ((float,), "a number"),
    "score.adversarial": ((str,), "a string"),
    "score.pgd_step_size": ((float,), "a number"),
    "score.num_classes": ((int,), "an integer"),
    "score.image_size": ((int,), "an integer"),
    "score.el2n_epochs": ((int,), "an integer"),
    "score.cache_memory": ((str, int), "a size such as 4GiB"),
    "embed.chunk_rows": ((int,), "an integer"),
    "embed.memory_limit": ((str, int), "a size such as 4GiB"),
    "index.nprobe": ((int,), "an integer"),
    "index.refine": ((int,), "an integer"),
    "extrapolate.methods": ((list,), "a list of method names"),
    "extrapolate.knn_k": ((int, str), "an integer or 'auto'"),
    "extrapolate.kernel_bandwidth": ((float, str), "a number or 'auto'"),
    "prune.score": ((str,), "a string"),
    "prune.source": ((str,), "a string"),
    "prune.noise_fraction": ((float, str), "a fraction or 'auto'"),
    "prune.shard_size": ((str, int), "a size such as 4GiB"),
    "prune.max_count": ((int,), "an integer"),
    "prune.name": ((str,), "a string"),
    "prune.reshard": ((str,), "a string"),
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}


def _checked(option: str, value):
    """``value`` of ``option`` ("stage.key") if it has the option's type, else a one-line error.

    Ints are numbers too; a string for a list option is a comma-separated list, like the CLI flags.
    """
    stage, key = option.split(".", 1)
    default = DEFAULTS.get(stage, {}).get(key)
    if option not in _TYPES and default is None:
        return value
    types, what = _TYPES.get(option) or ((type(default),), _TYPE_NAMES.get(type(default), type(default).__name__))
    if list in types:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif not isinstance(value, bool) or bool in types:
        if isinstance(value, types):
            return value
        if float in types and isinstance(value, int):
            return float(value)
    raise StreamPruneError(f"{option} must be {what}, not {value!r}")


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
                    if not isinstance(opts, str):
                        raise StreamPruneError(f"--config {path}: {stage} must be a string, not {opts!r}")
                    setattr(cfg, stage, opts)
                    continue
                if stage not in DEFAULTS or not isinstance(opts, dict):
                    raise StreamPruneError(f"--config {path}: unknown table [{stage}] (stages: {', '.join(DEFAULTS)})")
                unknown = set(opts) - set(DEFAULTS[stage])
                if unknown:
                    raise StreamPruneError(f"--config {path}: [{stage}] has unknown option(s) {', '.join(sorted(unknown))}")
                try:
                    cfg.stages[stage].update({k: _checked(f"{stage}.{k}", v) for k, v in opts.items()})
                except StreamPruneError as exc:
                    raise StreamPruneError(f"--config {path}: {exc}") from None
        for stage, opts in (overrides or {}).items():
            cfg.stages[stage].update({k: _checked(f"{stage}.{k}", v) for k, v in opts.items() if v is not None})
        for k, v in top.items():  # --scheduler, --on-error, --force given on the command line win over the file
            if v is not None:
                setattr(cfg, k, v)
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
    checked = check_config(cfg, until)
    with shared_local_cluster():  # starts nothing unless a stage asks for a local cluster
        return _run_stages(shards, workspace, cfg, until, storage_options, echo, checked)


def check_config(cfg: RunConfig, until: str = "prune") -> dict:
    """Check the options of every stage up to ``until`` before the first one runs, with the stages' own rules.

    Returns what the stages take ready-made: the training and decoding configurations, the score
    parameters, the extrapolation methods and the index graph(s) they read.
    """
    from streamprune.compute import check_scheduler, parse_memory

    s = cfg.stages
    upto = ORDER.index(until)
    check_scheduler(cfg.scheduler)
    sc = s["score"]
    cache_memory = parse_memory(sc["cache_memory"], "score.cache_memory")
    check_whole(sc["full_runs"], "score.full_runs")
    if sc["full_runs"] > 1 and not sc["full"]:
        raise StreamPruneError("score.full_runs needs score.full (--full): replicas are full-data runs")
    check_whole(s["catalog"]["max_member_bytes"], "catalog.max_member_bytes")
    out: dict = {}
    fraction = s["subset"]["fraction"]
    if upto >= ORDER.index("subset") and not 0.0 < fraction <= 1.0:
        raise StreamPruneError(f"subset.fraction must be in (0, 1], not {fraction}")
    if upto >= ORDER.index("subset"):
        check_seed(s["subset"]["seed"], "subset.seed", signed=True)
    if upto >= ORDER.index("score"):
        from streamprune.decode import DecodeConfig
        from streamprune.scoring import check_scores
        from streamprune.train import TrainConfig, check_label_source

        out["train"] = TrainConfig(**{k: sc[k] for k in ("model", "model_kwargs", "epochs", "batch_size", "optimizer",
                                                         "lr", "weight_decay", "seed", "augment", "dynamics", "labels",
                                                         "adversarial", "pgd_steps", "pgd_step_size", "num_classes",
                                                         "device")},
                                   checkpoint_seconds=float(sc["checkpoint_every"]),
                                   **({"memory_budget": cache_memory} if cache_memory is not None else {}))
        out["decode"] = DecodeConfig(input=sc["input"], label_key=sc["label_key"], image_size=sc["image_size"],
                                     image_mode=sc["image_mode"])
        check_label_source(out["train"], out["decode"])
        if not sc["scores"]:
            raise StreamPruneError("score.scores names no score")
        out["params"] = {"window": sc["window"], "decay": sc["decay"], "el2n_epochs": sc["el2n_epochs"]}
        check_scores(list(sc["scores"]), out["params"], sc["epochs"])
    if upto >= ORDER.index("embed"):
        from streamprune.embed import check_embed_options

        e = s["embed"]
        parse_memory(e["memory_limit"], "embed.memory_limit")
        check_embed_options(encoder=e["encoder"], dtype=e["dtype"], batch_size=e["batch_size"],
                            chunk_rows=e["chunk_rows"], threads=None,
                            name=lambda flag: f"embed.{flag.replace('-', '_')}")
    if upto >= ORDER.index("index"):
        ix = s["index"]
        check_whole(ix["k"], "index.k", 1)
        for key, least in (("nprobe", 1), ("refine", 0)):
            check_optional_whole(ix[key], f"index.{key}", least)
    methods = list(s["extrapolate"]["methods"])
    out["methods"], out["graph"] = methods, graphs_for(methods, s["extrapolate"]["gcn_prior"])
    if upto >= ORDER.index("index"):
        from streamprune.extrapolate import check_method

        if not methods:
            raise StreamPruneError("extrapolate.methods names no method")
        for m in methods:
            check_method(m)
        _check_extrapolate_options(s, methods)
    if upto >= ORDER.index("prune"):
        from streamprune.prune import check_options

        p = s["prune"]
        if p["score"] is not None and p["score"] not in sc["scores"]:
            raise StreamPruneError(f"prune.score must be one of the run's scores ({', '.join(sc['scores'])}), "
                                   f"not {p['score']!r}")
        check_options(**prune_options(s, methods), seed=p["seed"])
    return out


def prune_options(s: dict, methods: list[str]) -> dict:
    """:func:`~streamprune.prune.prune`'s options from ``[prune]``: the score is the first of
    ``[score] scores`` unless named, the source the last extrapolation method unless named."""
    p = s["prune"]
    out = {"score": p["score"] or s["score"]["scores"][0], "source": p["source"] or methods[-1],
           **{key: p[key] for key in ("strategy", "keep_fraction", "name", "reshard", "shard_size", "max_count")}}
    if p["noise_fraction"] is not None:  # hard-clean's; another strategy refuses it by name
        out["noise_fraction"] = p["noise_fraction"]
    return out


RUN_OPTIONS = {"knn_k": ("knn", "k"), "gcn_epochs": ("gcn", "epochs"), "gcn_k": ("gcn", "k"),
               "gcn_patience": ("gcn", "patience"), "gcn_prior": ("gcn", "prior"),
               "propagate_tol": ("propagate", "tol"), "propagate_max_iter": ("propagate", "max_iter"),
               "kernel_bandwidth": ("kernel", "bandwidth")}
"""``[extrapolate]`` keys of the run configuration: the method and the keyword option of it each one
sets (checked up front with the method's rule, then passed to it)."""


def _check_extrapolate_options(s: dict, methods: list[str]) -> None:
    """The ``[extrapolate]`` options of the methods that will run, each refused by its own name with
    the method's own rule (:func:`~streamprune.extrapolate.common.option_rules`; the method applies
    the same rule when its stage begins, but only after training)."""
    from streamprune.extrapolate.common import option_rules

    x = s["extrapolate"]
    for key, (method, option) in RUN_OPTIONS.items():
        if method in methods:
            option_rules(method)[option].check(x[key], f"extrapolate.{key}")
    k_index = s["index"]["k"]
    if "gcn" in methods and whole(1)(k_index) and x["gcn_k"] > k_index:
        raise StreamPruneError(f"extrapolate.gcn_k = {x['gcn_k']} needs as many neighbours per row in the graph, "
                               f"which holds index.k = {k_index}: raise index.k or lower gcn_k")


def _run_stages(shards: list[str], workspace: str, cfg: RunConfig, until: str, storage_options: dict | None,
                echo, checked: dict) -> dict:
    ws = Workspace(workspace, storage_options)
    s = cfg.stages
    sched, on_error, force = cfg.scheduler, cfg.on_error, cfg.force
    timings: list[tuple[str, float, bool]] = []
    outputs: dict = {}
    # the longest stage name sets the column, so that "extrapolate du-label-aware" lines up too
    width = max([21, *(len(f"extrapolate {n}-{m}") for n in s["score"]["scores"] or ()
                       for m in checked.get("methods") or ())]) + 1

    def stage(name: str, fn):
        t0 = time.time()
        result = fn()
        if isinstance(result, list):
            results = result
        elif isinstance(result, dict) and "fingerprint" not in result and "skipped" not in result:
            results = list(result.values())  # several markers by name (index: seeds and all)
        else:
            results = [result, result.get("reshard")]  # prune's selection and its reshard (when --reshard)
        skipped = all(r.get("skipped") for r in results if isinstance(r, dict))
        timings.append((name, time.time() - t0, skipped))
        echo(f"{name:<{width}} {'skipped (done)' if skipped else 'done'} in {time.time() - t0:.1f}s")
        return result

    from streamprune.shards import catalog

    stage("catalog", lambda: catalog(shards, ws, on_error=s["catalog"]["on_error"] or on_error, scheduler=sched,
                                     force=force, max_member_bytes=s["catalog"]["max_member_bytes"]))
    if until == "catalog":
        return _finish(timings, outputs, echo)
    from streamprune.subset import subset

    stage("subset", lambda: subset(ws, fraction=s["subset"]["fraction"], seed=s["subset"]["seed"], force=force,
                                   scheduler=sched))
    if until == "subset":
        return _finish(timings, outputs, echo)

    from streamprune.scoring import compute_scores
    from streamprune.train import train

    sc = s["score"]
    tcfg, decode, params = checked["train"], checked["decode"], checked["params"]
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
    # the subset model's encoder decodes as training did (its marker says how); another encoder reads
    # the samples the way [score] says (label key, input kind, image size), not with the defaults
    decode_for_embed = None if e["encoder"] == "subset" else decode
    stage("embed", lambda: embed(ws, encoder=e["encoder"], dtype=e["dtype"], batch_size=e["batch_size"],
                                 chunk_rows=e["chunk_rows"], normalize=e["normalize"], decode=decode_for_embed,
                                 device=sc["device"], on_error=on_error, scheduler=sched, force=force,
                                 memory_limit=e["memory_limit"]))
    if until == "embed":
        return _finish(timings, outputs, echo)

    from streamprune.index import build_index

    methods, graph = checked["methods"], checked["graph"]
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
            opts = {option: x[key] for key, (method, option) in RUN_OPTIONS.items() if method == m}
            if m == "gcn":
                opts["device"] = sc["device"]  # [score] device is the run's: embed and the GCN use it too
            stage(f"extrapolate {score_name}-{m}",
                  lambda: extrapolate(ws, score_name, m, force=force, scheduler=sched, **opts))
    if until == "extrapolate":
        return _finish(timings, outputs, echo)

    from streamprune.prune import prune

    pm = stage("prune", lambda: prune(ws, **prune_options(s, methods), seed=s["prune"]["seed"], scheduler=sched,
                                      force=force))
    outputs["prune"] = pm
    return _finish(timings, outputs, echo)


def _finish(timings: list, outputs: dict, echo) -> dict:
    total = sum(t for _, t, _ in timings)
    echo("")
    width = max([26, *(len(name) for name, _, _ in timings)]) + 2
    echo(f"{'stage':<{width}}{'wall s':>10}  status")
    for name, t, skipped in timings:
        echo(f"{name:<{width}}{t:>10.1f}  {'skipped' if skipped else 'ran'}")
    echo(f"{'total':<{width}}{total:>10.1f}")
    if all(skipped for _, _, skipped in timings):
        echo("nothing to do: every stage was already done with this configuration")
    return {"timings": [{"stage": n, "wall_s": round(t, 3), "skipped": sk} for n, t, sk in timings],
            "outputs": outputs}

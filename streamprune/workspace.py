"""The job workspace: paths, stage markers written last, chunk records for resume, errors.jsonl.

Layout (see docs/artifacts.md)::

    WS/streamprune.json          version, per-stage config, input fingerprints
    WS/_stages/<stage>.json      commit marker of a finished stage (written last, atomically)
    WS/_stages/<stage>/<fp>/     chunk records and per-chunk error lists of a run in progress
    WS/_stages/<stage>.lease     the holder of a running stage (see streamprune.leases)
    WS/errors.jsonl              every skipped or rejected sample of committed stages

A stage's *fingerprint* hashes its config and the fingerprints of its inputs.  A marker with the
same fingerprint means "done, skip".  A marker with the same config but other inputs is stale
and the stage re-runs.  A marker with another config is refused unless ``force`` is given, so
results of two configs are never mixed.  Chunk records live under the fingerprint, so a resumed
run only trusts chunks written by the same config and inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from streamprune import __version__, leases, storage
from streamprune.errors import StreamPruneError

log = logging.getLogger(__name__)

STAGES = ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune")
# Commits of different stages rewrite streamprune.json and errors.jsonl: one at a time per workspace,
# across threads (this lock) and processes (a lease, waited for).
_SHARED_LOCK = threading.Lock()
SHARED_WAIT_S = 2 * leases.LEASE_S


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def train_key(full: bool, replica: int = 0) -> str:
    """Marker and folder of a training run: ``train``, ``train-full`` or replica ``train-full-r<N>``."""
    if replica and not full:
        raise StreamPruneError("replica training runs are full-data runs (use --full)")
    return "train-full" + (f"-r{replica}" if replica else "") if full else "train"


def command_for(stage: str) -> str:
    """The CLI command that produces a stage marker (e.g. 'train-full' -> 'score --full')."""
    replica = re.search(r"-full-r(\d+)$", stage)
    runs = f" --full-runs {int(replica.group(1)) + 1}" if replica else ""
    stage = stage[:replica.start() + len("-full")] if replica else stage
    if stage == "train":
        return "score"
    if stage == "train-full":
        return "score --full" + runs
    if stage.startswith("score-"):
        name = stage[len("score-"):]
        return f"score --score {name[:-5]} --full{runs}" if name.endswith("-full") else f"score --score {name}"
    for prefix in ("index", "extrapolate", "prune"):
        if stage.startswith(prefix + "-"):
            return prefix
    return stage


def rerun_command(key: str, markers: dict[str, dict] | None = None) -> str:
    """The command that re-makes marker ``key``, with the options that name it where the marker knows them."""
    config = ((markers or {}).get(key) or {}).get("config") or {}
    if key == "score-label_disagreement":
        return "extrapolate --method label-aware"
    if key.startswith("index-"):  # `index` alone builds both graphs
        return f"index --graph {key[len('index-'):]}"
    if key.startswith("extrapolate-") and config.get("method"):
        return f"extrapolate --score {config.get('score')} --method {config['method']}"
    if key.startswith("prune-") and config.get("source"):
        keep = (f"--keep-count {config['keep_count']}" if config.get("keep_count") is not None
                else f"--keep-fraction {config.get('keep_fraction')}")
        return (f"prune --name {config.get('name')} --score {config.get('score')} --from {config['source']} "
                f"--strategy {config.get('strategy')} {keep}")
    if key.startswith("reshard-"):
        return f"prune --name {config.get('name')} ... --reshard {config.get('out')}"
    return command_for(key)


# (config path, CLI flag, CLI default) of the options a marker records: a re-run hint carries those
# whose recorded value is not the default, so that pasting it repeats the run instead of being
# refused as "another configuration".  Options resolved at run time (chunk rows, the GCN's fanout)
# are recorded resolved, so a hint carries the value the run used (`--chunk-rows 8192`).
_DECODE_FLAGS = (("decode.input", "--input", "auto"), ("decode.label_key", "--label-key", "cls"),
                 ("decode.image_size", "--image-size", None), ("on_error", "--on-error", "fail"))
_TRAIN_FLAGS = (("train.model", "--model", "cnn"), ("train.model_kwargs", "--model-kwargs", {}),
                ("train.epochs", "--epochs", 30), ("train.batch_size", "--batch-size", 128),
                ("train.optimizer", "--optimizer", "sgd"), ("train.lr", "--lr", None),
                ("train.weight_decay", "--weight-decay", 5e-4), ("train.seed", "--seed", 0),
                ("train.augment", "--augment", "none"), ("train.dynamics", "--dynamics", "eval"),
                ("train.labels", "--labels", "supervised"), ("train.adversarial", "--adversarial", None),
                ("train.pgd_steps", "--pgd-steps", 5), ("train.pgd_step_size", "--pgd-step-size", None),
                ("train.num_classes", "--num-classes", None), ("train.device", "--device", "auto")) + _DECODE_FLAGS
_SCORE_FLAGS = (("params.window", "--window", 10), ("params.decay", "--decay", 0.9),
                ("params.el2n_epochs", "--el2n-epochs", None))
_FLAGS = {
    "subset": (("fraction", "--fraction", 0.2), ("seed", "--seed", 0)),
    "embed": (("encoder", "--encoder", "subset"), ("dtype", "--dtype", "float32"),
              ("normalize", "--normalize", False), ("batch_size", "--batch-size", 256),
              ("threads", "--threads", 1), ("chunk_rows", "--chunk-rows", None)) + _DECODE_FLAGS,
    "index": (("k", "--k", 20), ("factory", "--factory", "auto"),
              ("nprobe", "--nprobe", None), ("refine", "--refine", None), ("chunk_rows", "--chunk-rows", None)),
    "knn": (("k", "--k", "auto"), ("chunk_rows", "--chunk-rows", None)),
    "gcn": (("k", "--k", 10), ("hidden", "--hidden", [512, 256]), ("dropout", "--dropout", 0.5),
            ("epochs", "--epochs", 25), ("batch_size", "--batch-size", 128), ("lr", "--lr", 1e-3),
            ("weight", "--weight", "exp"), ("seed", "--gcn-seed", 0), ("prior", "--prior", "knn"),
            ("training", "--training", "auto"), ("patience", "--patience", 10), ("fanout", "--fanout", None),
            ("chunk_rows", "--chunk-rows", None)),
    "propagate": (("tol", "--tol", 1e-3), ("max_iter", "--max-iter", 50), ("k", "--k", None),
                  ("chunk_rows", "--chunk-rows", None)),
    "kernel": (("bandwidth", "--bandwidth", "auto"), ("chunk_rows", "--chunk-rows", None)),
    "prune": (("seed", "--seed", 0), ("options.eps", "--eps", None),
              ("options.noise_fraction", "--noise-fraction", None)),
}
_UNSET = object()


def _get(config: dict, path: str, default=_UNSET):
    for part in path.split("."):
        if not isinstance(config, dict) or part not in config:
            return default
        config = config[part]
    return config


def _flags(table: tuple, config: dict, **values) -> list[str]:
    """The CLI options of ``table`` whose value (in ``values``, else in ``config``) is not the CLI default."""
    out = []
    for path, flag, default in table:
        value = values[path] if path in values else _get(config, path, default)
        if value == default or (isinstance(value, (list, tuple)) and list(value) == default):
            continue
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            text = (json.dumps(value, separators=(",", ":")) if isinstance(value, dict)
                    else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
            out += [flag, shlex.quote(text)]
    return out


def _train_flags(tkey: str, markers: dict[str, dict]) -> list[str]:
    """The options of the training run ``tkey`` (replica runs: those of the first run, whose seed they offset)."""
    replica = re.search(r"-r(\d+)$", tkey)
    first = markers.get("train-full") if replica else None
    if first:
        return _flags(_TRAIN_FLAGS, first.get("config") or {})
    config = (markers.get(tkey) or {}).get("config") or {}
    seed = _get(config, "train.seed", 0)
    if replica and isinstance(seed, int):
        seed -= int(replica.group(1))
    return _flags(_TRAIN_FLAGS, config, **{"train.seed": seed})


def repeat_command(key: str, markers: dict[str, dict] | None = None) -> str:
    """:func:`rerun_command` with the options recorded in the marker's config that differ from the CLI
    defaults: the command that repeats that run (a missing marker gives the bare command)."""
    markers = markers or {}
    m = markers.get(key) or {}
    config = m.get("config") or {}
    if key == "catalog":  # its shards are arguments: as many as the catalog holds, named by the user
        return "catalog SHARDS..."
    base = rerun_command(key, markers)
    if not config or key.startswith("reshard-") or key == "score-label_disagreement":
        return base
    flags: list[str] = []
    if key == "subset" or key == "embed":
        flags = _flags(_FLAGS[key], config)
    elif key.startswith("index-"):
        flags = _flags(_FLAGS["index"], config)
    elif key.startswith("prune-"):
        flags = _flags(_FLAGS["prune"], config)
    elif key.startswith("extrapolate-"):
        gcn = {}
        if config.get("method") == "gcn":  # a run without early stopping records no patience; the fan-out is
            fanout = config.get("fanout") or []  # recorded per hop, all k neighbours being the default
            gcn = {"patience": config.get("patience", 0),
                   "fanout": fanout if any(f < config.get("k", 10) for f in fanout) else None}
        flags = _flags(_FLAGS.get(config.get("method"), ()), config, **gcn)
    elif m.get("stage") == "train":
        made = [s for s in markers.values() if s.get("stage") == "score" and s.get("key") != "score-label_disagreement"
                and (s.get("inputs") or {}).get("train") == m.get("fingerprint")]
        names = sorted({str((s.get("config") or {}).get("score")) for s in made})
        flags = (["--score", ",".join(names)] if names and names != ["du"] else []) + _train_flags(key, markers)
        params = {k: v for s in made for k, v in ((s.get("config") or {}).get("params") or {}).items()}
        flags += _flags(_SCORE_FLAGS, {"params": params})
    elif m.get("stage") == "score":
        full = re.search(r"-full(-r\d+)?$", key)
        flags = _flags(_SCORE_FLAGS, config) + _train_flags("train" + (full.group(0) if full else ""), markers)
    return " ".join([base, *flags])


def missing_input(role: str, markers: dict[str, dict]) -> bool:
    """Whether input ``role`` names a stage marker (``train``, ``index-all``, ...) that is not there."""
    named = role in ("catalog", "subset", "train", "embed") or role.startswith(("train-full", "index-"))
    return named and role not in markers


def pipeline_order(key: str, marker: dict | None = None) -> tuple[int, str]:
    """Sort key putting markers in the order their stages run (subset before train before score ...)."""
    order = ("catalog", "subset", "train", "score", "embed", "index", "extrapolate", "prune")
    stage = (marker or {}).get("stage") or ("train" if key.startswith("train") else command_for(key).split()[0])
    return (order.index(stage) if stage in order else len(order), key)


def dependency_order(markers: dict[str, dict]) -> list[str]:
    """The keys of ``markers``, each after the markers whose results it read (the fingerprints its
    recorded inputs name), otherwise in :func:`pipeline_order`.  Re-running stale stages in this
    order re-makes every input before what reads it, whichever stage made it: label disagreement is
    a score that reads the all-rows graph, made by `extrapolate --method label-aware`."""
    key_of = {m["fingerprint"]: key for key, m in markers.items() if m.get("fingerprint")}
    reads = {key: {key_of[fp] for fp in (m.get("inputs") or {}).values() if isinstance(fp, str) and fp in key_of}
             - {key} for key, m in markers.items()}
    waiting = sorted(markers, key=lambda key: pipeline_order(key, markers[key]))
    placed: list[str] = []
    while waiting:  # tens of markers: the first one ready, by a scan
        key = next((k for k in waiting if reads[k] <= set(placed)), waiting[0])  # [0]: a cycle, made by no stage
        waiting.remove(key)
        placed.append(key)
    return placed


def _flat(config: dict, prefix: str = "") -> dict:
    """``config`` with nested options as dotted keys (``train.epochs``), to name what changed."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value, width: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _compatible(version_a: str, version_b: str) -> bool:
    """Workspaces are compatible across patch releases (same major.minor)."""
    return version_a.split(".")[:2] == version_b.split(".")[:2]


class Workspace:
    """A job directory, local or on object storage."""

    def __init__(self, url: str, storage_options: dict | None = None):
        if not url:
            raise StreamPruneError("a workspace is required (-w/--workspace)")
        from streamprune.compute import refuse_in_main_reimport

        refuse_in_main_reimport()
        self.url = storage.normalize(url)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"Workspace({self.url!r})"

    # paths and documents -------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """URL of a path inside the workspace."""
        return storage.join(self.url, *parts)

    def read_json(self, *parts: str) -> Any | None:
        """A JSON document inside the workspace, or None."""
        return storage.read_json(self.path(*parts), self.storage_options)

    def write_json(self, obj: Any, *parts: str) -> None:
        """Atomically write a JSON document inside the workspace."""
        storage.write_json_atomic(self.path(*parts), obj, self.storage_options)

    def exists(self, *parts: str) -> bool:
        """Whether a path exists inside the workspace."""
        return storage.exists(self.path(*parts), self.storage_options)

    # metadata --------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """Contents of streamprune.json (empty skeleton for a new workspace)."""
        meta = self.read_json("streamprune.json")
        if meta is None:
            return {"version": __version__, "stages": {}, "inputs": {}}
        if not isinstance(meta, dict) or "version" not in meta:
            raise StreamPruneError(f"{self.path('streamprune.json')} is not a streamprune workspace file")
        return meta

    def check_version(self, force: bool = False) -> None:
        """Refuse a workspace written by an incompatible streamprune version."""
        meta = self.read_json("streamprune.json")
        if meta and not _compatible(str(meta.get("version", "")), __version__) and not force:
            raise StreamPruneError(
                f"workspace {self.url} was made by streamprune {meta.get('version')}, this is {__version__}; "
                "use a new workspace or --force to overwrite")

    def update_metadata(self, stage: str, config: dict, inputs: dict | None = None) -> None:
        """Record a stage's config (and, for catalog, the input fingerprints) in streamprune.json."""
        meta = self.metadata()
        meta["version"] = __version__
        meta.setdefault("stages", {})[stage] = config
        if inputs is not None:
            meta["inputs"] = inputs
        self.write_json(meta, "streamprune.json")

    # markers ---------------------------------------------------------------------------------
    def marker(self, stage: str, *, check_version: bool = True) -> dict | None:
        """The commit marker of ``stage`` or None when it has not finished.

        A marker that is not a JSON object, or (unless ``check_version`` is False) one written by
        an incompatible streamprune version, is refused with one line.
        """
        m = self.read_json("_stages", f"{stage}.json")
        if m is None:
            return None
        where = self.path("_stages", f"{stage}.json")
        if not isinstance(m, dict):
            raise StreamPruneError(f"{where}: not a stage marker (expected a JSON object); remove it and re-run")
        version = m.get("version")
        if check_version and version is not None and not _compatible(str(version), __version__):
            raise StreamPruneError(f"{where} was written by streamprune {version}, this is {__version__}; "
                                   "use a new workspace or re-run the stage with --force")
        return m

    def require(self, stage: str, for_stage: str) -> dict:
        """The marker of an upstream stage, or a clear error saying which command to run first."""
        m = self.marker(stage)
        if m is None:
            raise StreamPruneError(f"{for_stage}: stage '{stage}' has not run in {self.url}; "
                                   f"run `streamprune {command_for(stage)}` first")
        return m

    def missing_outputs(self, marker: dict) -> list[str]:
        """The outputs a finished stage's marker names that are gone from the workspace (their URLs).

        A cache (training's decoded subset) is not a result: deleting it to free disk leaves the
        stage finished."""
        urls = [self.path(rel) for name, rel in (marker.get("outputs") or {}).items()
                if isinstance(rel, str) and name != "cache"]
        return [url for url in urls if not storage.exists(url, self.storage_options)]

    def markers(self) -> dict[str, dict]:
        """Every finished stage's marker by key (one listing; remote markers are read concurrently)."""
        names = [n[:-5] for n in storage.listdir(self.path("_stages"), self.storage_options)
                 if n.endswith(".json") and not n.startswith(".tmp")]
        if storage.is_remote(self.url) and len(names) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(16, len(names))) as pool:
                found = list(pool.map(lambda n: self.read_json("_stages", f"{n}.json"), names))
        else:
            found = [self.read_json("_stages", f"{n}.json") for n in names]
        return {n: m for n, m in zip(names, found) if isinstance(m, dict)}

    def outdated(self, key: str, markers: dict[str, dict] | None = None) -> tuple[str, str] | None:
        """Why marker ``key`` no longer describes the workspace, or None when it does.

        Returns (marker, input): ``marker`` is ``key`` or one of the markers it was made from,
        and its ``input`` has been re-run since (no current marker has the fingerprint it
        recorded).  A stage re-run with a new configuration or on new shards leaves the results
        made from its old outputs in place; they stay readable but must not be used.
        """
        markers = self.markers() if markers is None else markers
        current = {m.get("fingerprint"): k for k, m in markers.items()}
        memo: dict[str, tuple[str, str] | None] = {}

        def walk(k: str) -> tuple[str, str] | None:
            if k not in memo:  # no cycles: a fingerprint hashes those of its inputs
                memo[k] = None
                m = markers.get(k) or {}
                if m.get("stage") != "catalog":  # the catalog's input is the shard list, not a marker
                    for role, fp in sorted((m.get("inputs") or {}).items()):
                        if isinstance(fp, str):
                            up = current.get(fp)
                            memo[k] = (k, role) if up is None else walk(up)
                            if memo[k]:
                                break
            return memo[k]

        return walk(key)

    def outdated_line(self, key: str, markers: dict[str, dict] | None = None) -> str | None:
        """:meth:`outdated` as one line naming the command to run, or None.

        When the input's marker is gone (its stage has not run, or a re-run removed it and then
        failed), the line says so and names the command that makes that input again.
        """
        markers = self.markers() if markers is None else markers
        found = self.outdated(key, markers)
        if found is None:
            return None
        stale, role = found
        if missing_input(role, markers):
            # the config it last finished with, and the fingerprint ``stale`` knew it by
            known = {**markers, role: {"stage": "train" if role.startswith("train") else role.split("-")[0],
                                       "key": role, "config": self.metadata().get("stages", {}).get(role),
                                       "fingerprint": (markers[stale].get("inputs") or {}).get(role)}}
            return (f"{stale} is out of date (its input '{role}' is missing: it has not run or was removed); "
                    f"run `streamprune {repeat_command(role, known)} -w {self.url}`")
        return (f"{stale} is out of date (its input '{role}' was re-run since); re-run "
                f"`streamprune {repeat_command(stale, markers)} -w {self.url}`")

    def check_current(self, inputs: dict, for_stage: str) -> None:
        """Refuse to build on results made from outputs that have since been replaced."""
        fps = {fp for fp in inputs.values() if isinstance(fp, str)}
        if not fps:
            return
        markers = self.markers()
        for key, m in sorted(markers.items()):
            if m.get("fingerprint") in fps:
                line = self.outdated_line(key, markers)
                if line:
                    raise StreamPruneError(f"{for_stage}: {line} first")

    def begin(self, stage: str, config: dict, inputs: dict, force: bool = False, key: str | None = None,
              check: Callable[[], Any] | None = None) -> "StageRun":
        """Start (or resume, or skip) a stage run for ``config`` over ``inputs``.

        ``key`` names the marker when a stage has several independent outputs (e.g. one per
        score); it defaults to the stage name.  ``check`` runs only when the stage is about to run,
        before ``force`` removes anything: what it refuses (say a device this machine lacks) leaves
        the workspace as it was, and a finished run is still skipped.
        """
        self.check_version(force)
        name = key or stage
        fp = fingerprint({"stage": stage, "config": config, "inputs": inputs})
        if stage != "catalog":
            self.check_current(inputs, name)
        old = self.marker(name, check_version=not force)
        if old is not None and old.get("fingerprint") == fp and _compatible(str(old.get("version", __version__)),
                                                                            __version__) and not (
                force and self.missing_outputs(old)):
            return StageRun(self, stage, name, fp, config, inputs, already_done=True, previous=old)
        # Everything below (markers replaced, records dropped) and the run itself hold the stage's lease.
        held = leases.acquire(self.path("_stages", f"{name}.lease"), name, self.storage_options)
        try:
            return self._begin_held(stage, name, fp, config, inputs, force, held, check)
        except BaseException:
            leases.release(held)
            raise

    def _begin_held(self, stage: str, name: str, fp: str, config: dict, inputs: dict, force: bool,
                    held: leases.Lease, check: Callable[[], Any] | None) -> "StageRun":
        old = self.marker(name, check_version=not force)  # again: a run that held the lease may have committed
        other_version = old is not None and old.get("version") is not None and not _compatible(str(old["version"]),
                                                                                                __version__)
        if other_version:
            old = None  # --force over a marker of another version: start afresh
        if old is not None and old.get("fingerprint") != fp and old.get("config") != config and not force:
            was, now = _flat(old.get("config", {})), _flat(config)
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))

            def shown(k):  # old -> new, short: a list of shards would fill the screen
                return (f"{k} {_short(was[k]) if k in was else '(unset)'} -> "
                        f"{_short(now[k]) if k in now else '(unset)'}")
            raise StreamPruneError(
                f"{name}: workspace {self.url} already holds results of another configuration "
                f"(changed: {'; '.join(map(shown, changed)) or 'config'}); use --force to replace them "
                f"(`run --force` replaces every stage whose options changed; "
                f"`streamprune {rerun_command(name, {name: old})} ... --force` only this one)")
        if old is not None and old.get("fingerprint") == fp:
            gone = self.missing_outputs(old) if force else []
            if not gone:
                leases.release(held)
                return StageRun(self, stage, name, fp, config, inputs, already_done=True, previous=old)
            log.warning("%s: finished, but %s %s missing: running it again (--force)", name, ", ".join(gone),
                        "is" if len(gone) == 1 else "are")
        if check is not None:
            check()
        run = StageRun(self, stage, name, fp, config, inputs, lease=held)
        if old is not None or other_version:
            log.info("%s: config or inputs changed, re-running", name)
            storage.remove(self.path("_stages", f"{name}.json"), self.storage_options)
        # Drop records of interrupted runs under other fingerprints: never mix configs.
        for entry in storage.listdir(self.path("_stages", name), self.storage_options):
            if entry != fp[:16]:
                storage.remove(self.path("_stages", name, entry), self.storage_options, recursive=True)
        return run

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise a read-modify-write of a file shared by all stages (streamprune.json, errors.jsonl)."""
        with _SHARED_LOCK:
            held = leases.acquire(self.path("_stages", "shared.lease"), "workspace files", self.storage_options,
                                 wait=SHARED_WAIT_S)
            try:
                yield
            finally:
                leases.release(held)

    # errors ----------------------------------------------------------------------------------
    def errors(self) -> list[dict]:
        """All entries of errors.jsonl."""
        url = self.path("errors.jsonl")
        if not storage.exists(url, self.storage_options):
            return []
        out = []
        for i, line in enumerate(storage.read_bytes(url, self.storage_options).decode(errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StreamPruneError(f"{url} line {i + 1} is not valid JSON ({exc.msg}); it was damaged or "
                                       "edited: fix or remove that line (a stage that runs again rewrites its own "
                                       "lines)") from None
        return out

    def _replace_errors(self, stage_key: str, records: list[dict]) -> None:
        kept = [e for e in self.errors() if e.get("stage_key", e.get("stage")) != stage_key]
        body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept + records)
        storage.write_bytes_atomic(self.path("errors.jsonl"), body.encode(), self.storage_options)


@dataclass
class StageRun:
    """One run of a stage: chunk records for resume, per-chunk errors, and the final commit."""

    ws: Workspace
    stage: str
    key: str
    fingerprint: str
    config: dict
    inputs: dict
    already_done: bool = False
    previous: dict | None = None
    lease: leases.Lease | None = None
    started: float = field(default_factory=time.time)

    @property
    def _dir(self) -> str:
        return self.ws.path("_stages", self.key, self.fingerprint[:16])

    def chunk_done(self, chunk: str | int) -> dict | None:
        """The record of a finished chunk, or None."""
        return storage.read_json(storage.join(self._dir, "chunks", f"{chunk}.json"), self.ws.storage_options)

    def done_chunks(self) -> set[str]:
        """Ids of all finished chunks."""
        names = storage.listdir(storage.join(self._dir, "chunks"), self.ws.storage_options)
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".tmp")}

    def mark_chunk(self, chunk: str | int, info: dict | None = None, errors: Iterable[dict] = ()) -> None:
        """Record a chunk as finished; call only after its outputs are fully written."""
        if self.lease is not None:
            self.lease.check()
        errors = list(errors)
        if errors:
            body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors)
            storage.write_bytes_atomic(storage.join(self._dir, "errors", f"{chunk}.jsonl"), body.encode(),
                                       self.ws.storage_options)
        storage.write_json_atomic(storage.join(self._dir, "chunks", f"{chunk}.json"),
                                  {"chunk": str(chunk), "n_errors": len(errors), **(info or {})},
                                  self.ws.storage_options)

    def layout(self, record: str, url: str, chunks: str = "") -> dict | None:
        """The record ``record`` of the zarr output at ``url`` that this run created, or None: the caller
        creates the output (again) and records it.

        An output removed while the run's records stayed (deleted by hand after a failed run) makes them
        describe rows that are gone: the layout record and those of the chunks whose ids start with
        ``chunks`` are dropped, and the chunks are done again.
        """
        rec = self.chunk_done(record)
        if rec is not None and storage.exists(storage.join(url, "zarr.json"), self.ws.storage_options):
            return rec
        stale = sorted(c for c in self.done_chunks() if c.startswith(chunks) and c != record)
        if rec is not None:
            log.warning("%s: %s is gone; doing its %d recorded chunks again", self.key, url, len(stale))
            stale.append(record)
        for chunk in stale:
            self.forget_chunk(chunk)
        return None

    def forget_chunks(self) -> None:
        """Drop the chunk records of this run: their outputs are known to be gone or replaced."""
        storage.remove(storage.join(self._dir, "chunks"), self.ws.storage_options, recursive=True)

    def forget_chunk(self, chunk: str | int) -> None:
        """Drop the record of one chunk: its output is gone or replaced, and it is done again."""
        storage.remove(storage.join(self._dir, "chunks", f"{chunk}.json"), self.ws.storage_options)

    def chunk_errors(self) -> list[dict]:
        """Errors recorded by the finished chunks of this run, in chunk order."""
        out: list[dict] = []
        err_dir = storage.join(self._dir, "errors")
        for name in storage.listdir(err_dir, self.ws.storage_options):
            if name.endswith(".jsonl") and not name.startswith(".tmp"):
                text = storage.read_bytes(storage.join(err_dir, name), self.ws.storage_options).decode()
                out.extend(json.loads(line) for line in text.splitlines() if line.strip())
        return out

    def commit(self, outputs: dict, counts: dict, errors: list[dict] | None = None,
               timings: dict | None = None) -> dict:
        """Write errors.jsonl entries and then the stage marker, last and atomically; give the lease back."""
        if self.lease is not None:
            self.lease.check()
        errors = self.chunk_errors() if errors is None else errors
        for e in errors:
            e.setdefault("stage", self.stage)
            e["stage_key"] = self.key
        wall = time.time() - self.started
        marker = {
            "stage": self.stage,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": outputs,
            "counts": {**counts, "errors": len(errors)},
            "timings": {"wall_s": round(wall, 3), **(timings or {})},
            "version": __version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": uuid.uuid4().hex,  # this run's identity: runs of one config share the fingerprint
        }
        with self.ws.exclusive():
            self.ws._replace_errors(self.key, errors)
            self.ws.update_metadata(self.key, self.config)
            self.ws.write_json(marker, "_stages", f"{self.key}.json")
        # Chunk records are only needed until the marker exists.
        storage.remove(self.ws.path("_stages", self.key), self.ws.storage_options, recursive=True)
        if self.lease is not None:
            leases.release(self.lease)
        return marker

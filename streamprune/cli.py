"""Command line: a click group whose commands parse options and call one library function each."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager

import click

from streamprune import __version__
from streamprune.errors import StreamPruneError
from streamprune.shards import DEFAULT_MAX_MEMBER_BYTES


_PATH_PARAMS = ("output", "workspace", "reshard", "config_path", "shards", "test_shards", "directory")


def _one_line(exc: Exception, params: dict | None = None) -> str | None:
    """The line for a storage failure raised inside zarr/s3fs, zarr data that cannot be decoded, or a full
    disk anywhere; None for a bug.

    ``params`` (a command's options) name the paths the user gave, for an error that carries no file name.
    """
    from streamprune import storage
    from streamprune.compute import disk_full_message

    given: list[str] = []
    for name in _PATH_PARAMS:
        value = (params or {}).get(name)
        given += [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)]
    line = disk_full_message(exc) or storage.error_line(exc, given) or storage.zarr_read_error_line(exc)
    return None if line is None else storage.redact(line)


def _stdout_closed(exc: Exception) -> bool:
    """Whether ``exc`` is printing into a pipe whose reader has gone (`streamprune status | head`)."""
    tb = exc.__traceback__ if isinstance(exc, BrokenPipeError) else None
    while tb is not None:
        if tb.tb_frame.f_code is click.echo.__code__:
            return True
        tb = tb.tb_next
    return False


def _leave_quietly() -> None:
    """Exit as a program killed by SIGPIPE does (status 141, nothing printed): the work is done or
    resumable, and the reader asked for no more.  Output still buffered goes to /dev/null, not to a
    second BrokenPipeError at interpreter exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test runner's)
        pass
    sys.exit(141)


class _Command(click.Command):
    """A command whose storage errors name the path the user gave when the error itself names none."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (StreamPruneError, click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if _stdout_closed(exc):
                _leave_quietly()
            line = _one_line(exc, ctx.params)
            if line is None:
                raise
            raise click.ClickException(line) from None


class _Group(click.Group):
    """Turns user-facing errors into one clear line (exit 1) instead of a traceback."""

    command_class = _Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StreamPruneError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            line = _one_line(exc)  # one line, no traceback
            if line is None:
                raise
            raise click.ClickException(line) from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated):
                click.echo("terminated (SIGTERM); re-run the same command to resume", err=True)
                sys.exit(128 + signal.SIGTERM)
            click.echo("interrupted; re-run the same command to resume", err=True)
            sys.exit(130)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler preempting or cancelling the job), unwound as Ctrl-C is.

    The default action ended the process on the spot: no line said why, and the leases of the running
    stages stayed behind; a re-run on another host (a rescheduled pod, the next node of a batch
    queue) was refused until they expired.  Unwinding releases them, and each chunk is either
    recorded complete or redone.
    """


def _terminate(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="streamprune")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Prune datasets too big to train on twice: score a subset, extrapolate to every sample."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet = max(level, logging.ERROR if verbose == 0 else level)
    for noisy in ("distributed", "tornado", "asyncio", "fsspec", "s3fs", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(quiet)
    # distributed sets its loggers' levels from dask's config when it is first imported (later, by
    # the stage that starts a cluster): without this it logs every scheduler event at INFO.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", logging.getLevelName(quiet).lower())


def workspace_options(fn):
    """-w/--workspace and --storage-options, shared by every stage command."""

    @click.option("-w", "--workspace", required=True, help="Job workspace: local dir or s3://bucket/prefix.")
    @click.option("--storage-options", default=None, metavar="JSON",
                  help='fsspec options for s3:// paths, e.g. \'{"endpoint_url": "http://host:8333"}\'. '
                       "Credentials are best left to the AWS environment/config.")
    @functools.wraps(fn)
    def wrapper(*args, storage_options, **kwargs):
        from streamprune.storage import parse_storage_options

        return fn(*args, storage_options=parse_storage_options(storage_options), **kwargs)

    return wrapper


def run_options(fn):
    """--scheduler, --on-error and --force, shared by chunked stages."""
    fn = click.option("--force", is_flag=True, help="Replace results made with another configuration.")(fn)
    fn = click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
                      help="Stop at the first bad sample, or skip it and record it in errors.jsonl.")(fn)
    fn = click.option("--scheduler", default="local", show_default=True,
                      help="dask scheduler: local (worker processes), threads, sync, or tcp://host:8786.")(fn)
    return fn


def _in_workspace(workspace: str, path: str) -> str:
    """A marker's output (relative to the workspace) as the user can open it: under the -w they gave."""
    return f"{workspace.rstrip('/')}/{path}"


def _report(marker: dict, what: str) -> None:
    if marker.get("skipped"):
        click.echo(f"{what}: already done with this configuration; nothing to do")


def _stale(workspace: str, storage_options: dict | None) -> set[str] | None:
    """Markers of the workspace that are out of date (None when they cannot be read: best effort)."""
    from streamprune.workspace import Workspace

    try:
        ws = Workspace(workspace, storage_options)
        markers = ws.markers()
        return {k for k in markers if ws.outdated(k, markers)}
    except Exception:  # noqa: BLE001 - a note must not fail a command whose stage succeeded
        return None


@contextmanager
def _note_stale(workspace: str, storage_options: dict | None):
    """Around a stage command: one line naming the results it made out of date (a re-catalogue of
    other shards, a --force re-run), which stay readable but are refused by later stages until
    re-run.  Results already out of date before the command are not named again."""
    before = _stale(workspace, storage_options)
    yield
    after = _stale(workspace, storage_options)
    new = sorted(after - before) if before is not None and after is not None else []
    if new:
        click.echo(f"note: {len(new)} result(s) made from the previous ones are now out of date "
                   f"({', '.join(new)}); `streamprune status -w {workspace}` says what to re-run", err=True)


def notes_stale(fn):
    """Decorate a stage command with :func:`_note_stale` (below ``workspace_options``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _note_stale(kwargs["workspace"], kwargs.get("storage_options")):
            return fn(*args, **kwargs)
    return wrapper


@cli.command()
@click.argument("shards", nargs=-1, required=True)
@workspace_options
@run_options
@click.option("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES, show_default=True,
              help="Reject tar members larger than this.")
@notes_stale
def catalog(shards, workspace, storage_options, scheduler, on_error, force, max_member_bytes):
    """Index SHARDS (paths, globs, {000..009} patterns, s3:// prefixes): rows, keys, byte offsets."""
    from streamprune.shards import catalog as run

    t0 = time.time()
    m = run(shards, workspace, storage_options=storage_options, on_error=on_error, scheduler=scheduler,
            force=force, max_member_bytes=max_member_bytes)
    _report(m, "catalog")
    c = m["counts"]
    click.echo(f"catalog: {c['n_shards']} shards, {c['n_samples']} samples, {c['bytes'] / 1e6:.1f} MB "
               f"in {time.time() - t0:.1f}s" + (f"; {c['errors']} errors recorded in errors.jsonl" if c["errors"] else ""))


@cli.command()
@workspace_options
@click.option("--fraction", type=float, default=0.2, show_default=True, help="Expected subset fraction.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace a subset made with another fraction or seed.")
@click.option("--scheduler", default="local", show_default=True,
              help="dask scheduler hashing the keys (above ~1M rows): local, threads, sync, or tcp://host:8786.")
@notes_stale
def subset(workspace, storage_options, fraction, seed, force, scheduler):
    """Choose the seed subset: rows whose hash(key, seed) < fraction."""
    from streamprune.subset import subset as run

    m = run(workspace, fraction=fraction, seed=seed, storage_options=storage_options, force=force,
            scheduler=scheduler)
    _report(m, "subset")
    c = m["counts"]
    click.echo(f"subset: {c['n_subset']} of {c['n_samples']} rows ({c['realised_fraction']:.4f}, target {fraction})")


def decode_options(fn):
    """How samples are decoded: label source, input kind, image size."""
    fn = click.option("--image-mode", type=click.Choice(["auto", "L", "RGB"]), default="auto", show_default=True,
                      help="Image channels: auto (the first image's; a grayscale image among colour ones becomes "
                           "colour), L (grayscale) or RGB.")(fn)
    fn = click.option("--image-size", type=int, default=None, help="Resize images to this square size.")(fn)
    fn = click.option("--input", "input_kind", type=click.Choice(["auto", "image", "vector"]), default="auto",
                      show_default=True, help="Model input: an image member or an .npy vector.")(fn)
    fn = click.option("--label-key", default="cls", show_default=True,
                      help="Where the label is: cls, json.<field>, or none.")(fn)
    return fn


@cli.command()
@workspace_options
@run_options
@decode_options
@click.option("--score", "score_names", default="du", show_default=True,
              help="Comma-separated scores: du, tdds, el2n, forgetting, aum, entropy, margin, influence.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--model", default="cnn", show_default=True, help="resnet18, cnn, mlp or package.module:factory.")
@click.option("--model-kwargs", default="{}", metavar="JSON", help="Extra model arguments, e.g. '{\"width\": 0.5}'.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate (default 0.05 sgd, 1e-3 adamw).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--augment", type=click.Choice(["none", "crop", "crop-flip"]), default="none", show_default=True)
@click.option("--dynamics", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="Record dynamics from an eval pass after each epoch, or from the training pass.")
@click.option("--labels", default="supervised", show_default=True, help="supervised, or pseudo:K (k-means).")
@click.option("--adversarial", default=None, help="Adversarial training, e.g. linf:8/255 or l2:0.5.")
@click.option("--pgd-steps", type=int, default=5, show_default=True)
@click.option("--pgd-step-size", type=float, default=None)
@click.option("--num-classes", type=int, default=None, help="Default: max label + 1.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--window", type=int, default=10, show_default=True, help="DU/TDDS window (epochs).")
@click.option("--decay", type=float, default=0.9, show_default=True, help="TDDS decay.")
@click.option("--el2n-epochs", type=int, default=None,
              help="EL2N over the first K epochs (early training, as Paul et al.); default: all epochs.")
@click.option("--full", is_flag=True, help="Train on all rows: full-data scores (ground truth for evaluate).")
@click.option("--full-runs", type=int, default=1, show_default=True,
              help="With --full: this many full-data runs (training seeds SEED, SEED+1, ...); evaluate reports "
                   "how well they agree with each other and scores against their mean.")
@click.option("--cache-memory", default=None,
              help="Hold the decoded training rows in memory up to this size (default 2GiB), else stream them "
                   "from the on-disk cache.")
@click.option("--checkpoint-every", type=float, default=30.0, show_default=True,
              help="Seconds between training checkpoints (taken at the end of an epoch; a resumed run "
                   "re-trains the epochs after the last one). 0: after every epoch.")
@click.option("--fraction", type=float, default=None, help="Run `subset` with this fraction first.")
@click.option("--subset-seed", type=int, default=0, show_default=True)
@notes_stale
def score(workspace, storage_options, scheduler, on_error, force, image_size, image_mode, input_kind, label_key,
          score_names, epochs, model, model_kwargs, batch_size, optimizer, lr, weight_decay, seed, augment, dynamics,
          labels, adversarial, pgd_steps, pgd_step_size, num_classes, device, window, decay, el2n_epochs, full,
          full_runs, cache_memory, checkpoint_every, fraction, subset_seed):
    """Train on the subset (or all rows with --full) and compute seed scores."""
    from streamprune.compute import check_scheduler
    from streamprune.decode import DecodeConfig
    from streamprune.scoring import check_scores, compute_scores
    from streamprune.subset import subset as run_subset
    from streamprune.train import TrainConfig, train

    try:
        kwargs = json.loads(model_kwargs)
    except json.JSONDecodeError as exc:
        raise StreamPruneError(f"--model-kwargs is not valid JSON: {exc.msg}") from None
    cfg = TrainConfig(model=model, model_kwargs=kwargs, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      lr=lr, weight_decay=weight_decay, seed=seed, augment=augment, dynamics=dynamics, labels=labels,
                      adversarial=adversarial, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
                      num_classes=num_classes, device=device, checkpoint_seconds=checkpoint_every,
                      **_cache_memory(cache_memory))
    decode = DecodeConfig(input=input_kind, label_key=label_key, image_size=image_size, image_mode=image_mode)
    if full_runs < 1 or (full_runs > 1 and not full):
        raise StreamPruneError("--full-runs needs --full and must be at least 1")
    names = [n.strip() for n in score_names.split(",") if n.strip()]
    params = {"window": window, "decay": decay, "el2n_epochs": el2n_epochs}
    check_scores(names, params, epochs)  # before any training
    check_scheduler(scheduler)
    if fraction is not None and not full:
        run_subset(workspace, fraction=fraction, seed=subset_seed, storage_options=storage_options, force=force,
                   scheduler=scheduler)
    for replica in range(full_runs):
        m = train(workspace, cfg, decode, full=full, replica=replica, on_error=on_error, scheduler=scheduler,
                  force=force, storage_options=storage_options)
        _report(m, "train")
        t = m["timings"]
        run_tag = f" (run {replica + 1} of {full_runs})" if full_runs > 1 else ""
        click.echo(f"train{run_tag}: {m['counts']['n_valid']} rows x {m['counts']['epochs']} epochs on "
                   f"{t.get('device')}, {t.get('samples_per_s', 0):.0f} samples/s")
        for sm in compute_scores(workspace, names, full=full, replica=replica, params=params, force=force,
                                 storage_options=storage_options):
            c = sm["counts"]
            click.echo(f"score {sm['config']['score']}{' (full)' if full else ''}{run_tag}: {c['n_valid']} rows, "
                       f"mean {c['mean']:.4f}, std {c['std']:.4f} -> "
                       f"{_in_workspace(workspace, sm['outputs']['score'])}")


@cli.command()
@workspace_options
@run_options
@decode_options
@click.option("--encoder", default="subset", show_default=True,
              help="subset (the subset-trained model), features (the sample's .npy), or package.module:factory.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--chunk-rows", type=int, default=None, help="Rows per task and zarr chunk (default: >= 1 MB).")
@click.option("--normalize", is_flag=True, help="L2-normalise the vectors.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per task (0: torch's default).")
@click.option("--memory-limit", default=None, help="Memory per dask worker, e.g. 4GiB: sizes chunks and local workers.")
@notes_stale
def embed(workspace, storage_options, scheduler, on_error, force, image_size, image_mode, input_kind, label_key,
          encoder, dtype, batch_size, chunk_rows, normalize, device, threads, memory_limit):
    """Embed every sample into embeddings.zarr (N, D), with labels and a valid mask."""
    from streamprune.decode import DecodeConfig
    from streamprune.embed import embed as run

    decode = None
    if (encoder != "subset" or image_size is not None or image_mode != "auto" or input_kind != "auto"
            or label_key != "cls"):
        decode = DecodeConfig(input=input_kind, label_key=label_key, image_size=image_size, image_mode=image_mode)
    m = run(workspace, encoder=encoder, dtype=dtype, batch_size=batch_size, chunk_rows=chunk_rows, normalize=normalize,
            decode=decode, device=device, threads=threads, on_error=on_error, scheduler=scheduler, force=force,
            storage_options=storage_options, memory_limit=memory_limit)
    _report(m, "embed")
    c, t = m["counts"], m["timings"]
    click.echo(f"embed: {c['n_valid']} of {c['n']} rows -> {c['dim']}-d vectors in {t['embed_s']:.1f}s "
               f"({t['rows_per_s']:.0f} rows/s)" + (f"; {c['errors']} errors recorded" if c["errors"] else ""))


@cli.command("index")
@workspace_options
@click.option("--graph", type=click.Choice(["seeds", "all", "both"]), default="both", show_default=True,
              help="Neighbours among seed rows (kNN extrapolation), among all rows (GCN, label-aware), or both.")
@click.option("--k", type=int, default=20, show_default=True)
@click.option("--factory", default="auto", show_default=True, help='faiss factory string, e.g. "IVF4096,PQ32".')
@click.option("--nprobe", type=int, default=None)
@click.option("--refine", type=int, default=None,
              help="Re-rank the top R*k candidates exactly (default: 4 for PQ up to 8 GiB of embeddings, else 0).")
@click.option("--chunk-rows", type=int, default=None)
@click.option("--scheduler", default="local", show_default=True,
              help="dask scheduler adding and searching rows: local (worker processes), threads, sync, or "
                   "tcp://host:8786.")
@click.option("--force", is_flag=True, help="Replace indexes and graphs built with another configuration.")
@notes_stale
def index_cmd(workspace, storage_options, graph, k, factory, nprobe, refine, chunk_rows, scheduler, force):
    """Build the faiss index(es) and write kNN graphs to graph/<seeds|all>.zarr."""
    from streamprune.index import build_index

    out = build_index(workspace, graph=graph, k=k, factory=factory, nprobe=nprobe, refine=refine,
                      chunk_rows=chunk_rows, scheduler=scheduler, force=force, storage_options=storage_options)
    for name, m in out.items():
        _report(m, f"index {name}")
        c = m["counts"]
        click.echo(f"index {name}: {c['n_index']} rows indexed ({c['factory']}), {c['n']} queries, "
                   f"recall@{c['k']} {c['recall_at_k']:.4f} -> {_in_workspace(workspace, m['outputs']['graph'])}")


@cli.command()
@workspace_options
@click.option("--score", "score_name", default="du", show_default=True)
@click.option("--method", "methods", default="knn", show_default=True,
              help="Comma-separated: knn, gcn, label-aware, propagate, kernel.")
@click.option("--k", default=None, help="Neighbours: an integer, or 'auto' (knn: chosen on held-out seeds).")
@click.option("--epochs", type=int, default=None, help="GCN training epochs (default 25).")
@click.option("--hidden", default=None, help="GCN hidden widths, e.g. 512,256.")
@click.option("--dropout", type=float, default=None, help="GCN dropout (default 0.5).")
@click.option("--batch-size", type=int, default=None, help="GCN seed nodes per training batch (default 128).")
@click.option("--lr", type=float, default=None, help="GCN learning rate (default 1e-3).")
@click.option("--fanout", default=None, help="GCN neighbours sampled per hop in training, e.g. 10 or 10,5,5.")
@click.option("--weight", type=click.Choice(["exp", "sqrt"]), default=None,
              help="GCN edge weight: exp(-d) row-stabilised, or its symmetric sqrt variant.")
@click.option("--gcn-seed", type=int, default=None, help="GCN split/initialisation seed (default 0).")
@click.option("--patience", type=int, default=None,
              help="GCN: stop after this many epochs without a validation Pearson gain of 0.001 (default 10; "
                   "0: train all epochs).")
@click.option("--chunk-rows", type=int, default=None, help="Rows per inference task.")
@click.option("--memory-limit", default=None,
              help="GCN: hold a layer's inputs in memory below this size (e.g. 4GiB), else stream them.")
@click.option("--device", default=None, help="GCN device: auto, cpu, cuda.")
@click.option("--training", type=click.Choice(["auto", "sampled", "resident"]), default=None,
              help="GCN: sample each batch's neighbourhood, or keep the seeds' whole closure on the device "
                   "(auto: resident on CUDA when it fits).")
@click.option("--prior", type=click.Choice(["knn", "none"]), default=None,
              help="GCN: correct the kNN-extrapolated score (knn, the default) or predict from scratch (none).")
@click.option("--tol", type=float, default=None, help="propagate: stop when the change is below this.")
@click.option("--max-iter", type=int, default=None, help="propagate: at most this many iterations.")
@click.option("--bandwidth", default=None, help="kernel: 'auto' (chosen on held-out seeds) or a distance.")
@click.option("--scheduler", default="sync", show_default=True,
              help="dask scheduler: sync (in this process), local (worker processes), threads, or tcp://host:8786.")
@click.option("--force", is_flag=True, help="Replace results made with another configuration.")
def extrapolate(workspace, storage_options, score_name, methods, k, epochs, hidden, dropout, batch_size, lr, fanout,
                weight, gcn_seed, patience, chunk_rows, memory_limit, device, prior, training, tol, max_iter, bandwidth,
                scheduler, force):
    """Predict the score of every row from the seed rows: knn, gcn, label-aware, propagate, kernel."""
    from streamprune.extrapolate import extrapolate as run

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        from streamprune.extrapolate.common import known_methods

        raise StreamPruneError(f"--method names no method; choose one or more of {', '.join(known_methods())}")
    given = {"k": k, "epochs": epochs, "hidden": hidden, "dropout": dropout, "batch_size": batch_size, "lr": lr,
             "fanout": fanout, "weight": weight, "seed": gcn_seed, "patience": patience, "chunk_rows": chunk_rows,
             "memory_limit": memory_limit, "device": device, "prior": prior, "training": training, "tol": tol,
             "max_iter": max_iter, "bandwidth": bandwidth}
    unused = [name for name, v in given.items()
              if v is not None and not any(name in METHOD_OPTIONS.get(m, ()) for m in chosen)]
    if unused:  # one line, not an error: a shared command line may carry options of other methods
        flags = ", ".join("--gcn-seed" if n == "seed" else "--" + n.replace("_", "-") for n in unused)
        click.echo(f"warning: {flags} not used by --method {','.join(chosen)}; ignored", err=True)
    for method in chosen:
        opts = extrapolate_options(method, **given)
        m = run(workspace, score_name, method, scheduler=scheduler, force=force, storage_options=storage_options,
                **opts)
        _report(m, f"extrapolate {method}")
        c = m["counts"]
        click.echo(f"extrapolate {score_name} ({method}): {c.get('n_predicted', '?')} rows predicted, "
                   f"{c.get('n_seed', '?')} seed rows kept -> {_in_workspace(workspace, m['outputs']['extrapolated'])}")


def _cache_memory(value) -> dict:
    """TrainConfig's ``memory_budget`` from ``--cache-memory`` (nothing when not given)."""
    from streamprune.compute import parse_memory

    return {} if value is None else {"memory_budget": parse_memory(value, "--cache-memory")}


METHOD_OPTIONS = {"knn": ("k", "chunk_rows"),
                  "gcn": ("k", "epochs", "hidden", "dropout", "batch_size", "lr", "fanout", "weight", "seed",
                          "patience", "chunk_rows", "memory_limit", "device", "prior", "training"),
                  "propagate": ("k", "tol", "max_iter", "chunk_rows"),
                  "kernel": ("bandwidth", "chunk_rows"),
                  "label-aware": ("k", "chunk_rows")}
"""The options of ``streamprune extrapolate`` each method takes (by keyword)."""


def extrapolate_options(method: str, **given) -> dict:
    """The options of ``extrapolate`` that apply to ``method``, parsed (None = the method's default)."""
    from dask.utils import parse_bytes

    applies = METHOD_OPTIONS.get(method, ())
    opts = {}
    for name in applies:
        v = given.get(name)
        if v is None:
            continue
        if name == "k":
            v = v if v == "auto" else _int_option("--k", v)
        elif name == "hidden":
            v = tuple(_int_option("--hidden", h) for h in str(v).split(","))
        elif name == "fanout":
            parts = [_int_option("--fanout", f) for f in str(v).split(",")]
            v = parts[0] if len(parts) == 1 else tuple(parts)
        elif name == "memory_limit":
            try:
                v = parse_bytes(v)
            except ValueError:
                raise StreamPruneError(f"--memory-limit must be a size like 4GiB, got {v!r}") from None
        elif name == "bandwidth" and v != "auto":
            try:
                v = float(v)
            except ValueError:
                raise StreamPruneError(f"--bandwidth must be 'auto' or a number, got {v!r}") from None
        opts[name] = v
    return opts


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _int_option(flag: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StreamPruneError(f"{flag} must be an integer, got {value!r}") from None


@cli.command("prune")
@workspace_options
@click.option("--score", "score_name", default="du", show_default=True)
@click.option("--from", "source", default="knn", show_default=True,
              help="Score source: knn, gcn, label-aware, propagate, kernel, seed or full.")
@click.option("--strategy", default="hard", show_default=True,
              help="hard, easy, ccs, balanced, random, influence-budget, hard-clean.")
@click.option("--keep-fraction", type=float, default=None)
@click.option("--keep-count", type=int, default=None)
@click.option("--name", default=None, help="Name of the pruned view (prune/<name>/).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reshard", default=None, help="Write kept samples to new tars here (local dir or s3://).")
@click.option("--shard-size", default=None, help="Target bytes per output shard, e.g. 1GB.")
@click.option("--max-count", type=int, default=None, help="At most this many samples per output shard.")
@click.option("--eps", type=float, default=None, help="influence-budget: budget on the removed influence.")
@click.option("--noise-fraction", default=None, help="hard-clean: 'auto' or a fraction to drop first.")
@click.option("--durable", is_flag=True, help="--reshard: fsync every output tar before it is renamed into place.")
@click.option("--scheduler", default="local", show_default=True,
              help="dask scheduler writing --reshard shards: local (worker processes), threads, sync, or "
                   "tcp://host:8786.")
@click.option("--force", is_flag=True, help="Replace a pruned set of this name made with another configuration.")
def prune_cmd(workspace, storage_options, score_name, source, strategy, keep_fraction, keep_count, name, seed, reshard,
              shard_size, max_count, eps, noise_fraction, durable, scheduler, force):
    """Select samples and write shards.txt, kept keys, stats.json, optionally new shards."""
    from streamprune.compute import parse_memory
    from streamprune.prune import prune

    opts = {}
    if eps is not None:
        opts["eps"] = eps
    if noise_fraction is not None:
        opts["noise_fraction"] = _number_or_text(noise_fraction)  # prune refuses what is neither 'auto' nor a fraction
    shard_size = parse_memory(shard_size, "--shard-size")  # before the selection runs
    m = prune(workspace, score=score_name, source=source, strategy=strategy, keep_fraction=keep_fraction,
              keep_count=keep_count, name=name, seed=seed, reshard=reshard, shard_size=shard_size, max_count=max_count,
              durable=durable, scheduler=scheduler, force=force, storage_options=storage_options, **opts)
    if "reshard" not in m:
        _report(m, "prune")
    elif m.get("skipped") and m["reshard"].get("skipped"):
        click.echo("prune: selection and reshard already done with this configuration; nothing to do")
    elif m.get("skipped"):
        click.echo("prune: selection already done with this configuration; re-wrote the shards")
    c = m["counts"]
    click.echo(f"prune: kept {c['n_kept']} of {c['n_eligible']} eligible rows ({c['keep_fraction']:.3f}) in "
               f"{c['n_shards']} shards -> {_in_workspace(workspace, m['outputs']['shards'])}")
    if m["outputs"].get("reshard"):
        click.echo(f"prune: re-written shards -> {m['outputs']['reshard']}")


@cli.command("scores")
@workspace_options
@click.option("-o", "--output", required=True, help="FILE.parquet or FILE.csv (local or s3://).")
def scores_cmd(workspace, storage_options, output):
    """Export url, key, row, label and every score column (seed, full, extrapolated)."""
    from streamprune.export import export_scores

    info = export_scores(workspace, output, storage_options=storage_options)
    click.echo(f"scores: {info['rows']} rows, columns {', '.join(info['columns'])} -> {output}")


@cli.command()
@workspace_options
@click.option("--score", "score_name", default="du", show_default=True)
@click.option("--pruning-curve", default=None, metavar="F1,F2,...",
              help="Keep fractions at which to train fresh models on pruned sets, e.g. 0.1,0.3,0.5,0.7.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs of each pruning-curve model.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Training seeds per pruning-curve point.")
@click.option("--strategy", "strategies", default="hard", show_default=True, help="Comma-separated strategies.")
@click.option("--test", "test_shards", multiple=True, help="Held-out test shards (for --pruning-curve).")
@click.option("--json", "as_json", is_flag=True)
def evaluate(workspace, storage_options, score_name, pruning_curve, epochs, seeds, strategies, test_shards, as_json):
    """Fidelity of every extrapolation against full-data scores, cost, and pruning curves."""
    from streamprune.evaluate import evaluate as run, format_evaluation

    keeps = None
    if pruning_curve:
        try:
            keeps = [float(k) for k in pruning_curve.split(",") if k.strip()]
        except ValueError:
            raise StreamPruneError(f"--pruning-curve must be comma-separated keep fractions in (0, 1], e.g. "
                                   f"0.3,0.5,0.7, not {pruning_curve!r}") from None
    out = run(workspace, score_name, pruning_curve_keeps=keeps, epochs=epochs, test_shards=list(test_shards),
              seeds=seeds, strategies=tuple(x.strip() for x in strategies.split(",") if x.strip()),
              storage_options=storage_options)
    click.echo(json.dumps(out, indent=1) if as_json else format_evaluation(out))


@cli.command()
@workspace_options
@click.option("-o", "--output", default=None, help="Directory for the plots and report.md (default WS/report).")
@click.option("--score", "score_name", default="du", show_default=True)
def report(workspace, storage_options, output, score_name):
    """PNG plots (score distributions, scatter vs full, pruning curve, per-class kept) and report.md."""
    from streamprune.report import report as run

    out = run(workspace, output, score=score_name, storage_options=storage_options)
    click.echo(f"report: {out['report']} ({len(out['files'])} files)")


@cli.command("run")
@click.argument("shards", nargs=-1, required=True)
@workspace_options
@click.option("--config", "config_path", default=None, help="TOML file with one table per stage.")
@click.option("--until", default="prune", show_default=True,
              type=click.Choice(["catalog", "subset", "score", "embed", "index", "extrapolate", "prune"]))
@click.option("--scheduler", default=None, help="dask scheduler (default local).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default=None)
@click.option("--force", is_flag=True, help="Replace the results of every stage whose options changed.")
@click.option("--fraction", type=float, default=None)
@click.option("--score", "score_names", default=None, help="Comma-separated scores.")
@click.option("--epochs", type=int, default=None)
@click.option("--model", default=None)
@click.option("--full", is_flag=True, default=None, help="Also train on all rows (ground truth for evaluate).")
@click.option("--full-runs", type=int, default=None, help="With --full: this many full-data runs (see `score`).")
@click.option("--methods", default=None, help="Comma-separated extrapolation methods, e.g. knn,gcn.")
@click.option("--strategy", default=None)
@click.option("--keep-fraction", type=float, default=None)
@click.option("--reshard", default=None, help="Write kept samples to new shards here.")
def run_cmd(shards, workspace, storage_options, config_path, until, scheduler, on_error, force, fraction, score_names,
            epochs, model, full, full_runs, methods, strategy, keep_fraction, reshard):
    """Run every stage (catalog ... prune), skipping those already done; prints a timing table."""
    from streamprune.pipeline import RunConfig, run_pipeline

    overrides = {
        "subset": {"fraction": fraction},
        "score": {"scores": score_names, "epochs": epochs, "model": model, "full": full, "full_runs": full_runs},
        "extrapolate": {"methods": methods},
        "prune": {"strategy": strategy, "keep_fraction": keep_fraction, "reshard": reshard},
    }
    cfg = RunConfig.load(config_path, overrides, scheduler=scheduler, on_error=on_error, force=force or None)
    out = run_pipeline(list(shards), workspace, cfg, until=until, storage_options=storage_options, echo=click.echo)
    prune_m = out["outputs"].get("prune")
    if prune_m:
        click.echo(f"shards.txt: {_in_workspace(workspace, prune_m['outputs']['shards'])}")
        if prune_m["outputs"].get("reshard"):  # what a training job reads when the kept samples were re-written
            click.echo(f"re-written shards: {prune_m['outputs']['reshard']}")


@cli.command()
@workspace_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(workspace, storage_options, as_json):
    """Stages done, counts, artifact locations and errors of a workspace."""
    from streamprune.status import format_status, status as run

    info = run(workspace, storage_options)
    click.echo(json.dumps(info, indent=1) if as_json else format_status(info))


@cli.command()
@click.argument("directory", default="streamprune-demo")
@click.option("--scheduler", default="threads", show_default=True, help="dask scheduler for the stages.")
@click.option("--fraction", type=float, default=0.2, show_default=True, help="Seed subset fraction.")
@click.option("--epochs", type=int, default=30, show_default=True, help="Training epochs (subset and full).")
@click.option("--pruning-curve", default="0.3,0.5,0.7", show_default=True,
              help="Keep fractions for the evaluation's pruning curve ('' to skip).")
@click.option("--curve-epochs", type=int, default=15, show_default=True)
@click.option("--quick", is_flag=True, help="Fewer epochs everywhere (a smoke run, not for the figures).")
def demo(directory, scheduler, fraction, epochs, pruning_curve, curve_epochs, quick):
    """Write a demo dataset (digits, 10% flipped labels) to DIRECTORY and run the whole pipeline on it.

    Runs catalog, subset, score (subset and full data, DU), embed, index, extrapolate (knn, gcn,
    label-aware), prune, then evaluate and report; prints where shards.txt and the report are.
    """
    from streamprune.demo import make_demo
    from streamprune.evaluate import evaluate as run_evaluate, format_evaluation
    from streamprune.pipeline import RunConfig, run_pipeline
    from streamprune.report import report as run_report

    if quick:
        epochs, curve_epochs = min(epochs, 12), min(curve_epochs, 4)
    data_dir = os.path.join(directory, "data")
    ws = os.path.join(directory, "ws")
    info = make_demo(data_dir)
    click.echo(f"demo data: {info['n_train']} training samples ({info['n_noisy']} with flipped labels) "
               f"in {len(info['train'])} shards, {info['n_test']} test samples: {data_dir}")
    cfg = RunConfig.load(None, {
        "subset": {"fraction": fraction},
        "score": {"scores": ["du"], "epochs": epochs, "model": "cnn", "full": True, "window": 10},
        "index": {"k": 20},
        "extrapolate": {"methods": ["knn", "gcn", "label-aware"], "gcn_epochs": 10 if quick else 25},
        # the demo data carries flipped labels: drop the likely-mislabelled rows, then keep the hardest
        "prune": {"source": "label-aware", "strategy": "hard-clean", "keep_fraction": 0.7, "name": "demo"},
    }, scheduler=scheduler)
    out = run_pipeline([info["train_pattern"]], ws, cfg, storage_options=None, echo=click.echo)
    keeps = [float(k) for k in pruning_curve.split(",") if k.strip()]
    evaluation = run_evaluate(ws, "du", pruning_curve_keeps=keeps or None, epochs=curve_epochs,
                              test_shards=info["test"],
                              strategies=("hard-clean",) if quick else ("hard", "hard-clean"))
    click.echo(format_evaluation(evaluation))
    rep = run_report(ws, score="du")
    click.echo(f"shards.txt: {os.path.join(ws, out['outputs']['prune']['outputs']['shards'])}")
    click.echo(f"report: {rep['report']}")


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli(prog_name="streamprune")
    finally:
        # A failed command can leave zarr's concurrent reads pending on its I/O loop; destroyed at exit,
        # each logged "Task was destroyed but it is pending!" with its repr below the command's one line.
        logging.getLogger("asyncio").disabled = True


if __name__ == "__main__":
    main()

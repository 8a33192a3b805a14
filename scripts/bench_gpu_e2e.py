"""End-to-end GPU benchmark: the product's stages against bare kernels measured in the same run.

1. **shards** — N synthetic 32 px RGB PNGs with learnable class structure (10 classes: a colour
   and a shape per class, jittered position/size/colour, pixel noise, 5 % label noise) written
   as WebDataset shards (``.png`` + ``.cls``) by all cores.  Skipped for shards already there.
2. **bare kernels** on in-memory tensors: ResNet-18 (CIFAR stem, bf16 autocast, channels_last)
   training and forward img/s, PNG decode/s on all cores, exact kNN (torch matmul + topk,
   chunked) of N x D against itself with k=21, a 3-layer GCN forward as CSR matmuls over N
   nodes and 20 N edges.  Kept in ``WORKDIR/bare-<N>.json`` and re-used by later invocations.
3. **product** — ``streamprune.pipeline.run_pipeline`` (resnet18, DU, subset, knn + gcn, prune)
   and then the same with ``score.full`` for full-data scoring (the speedup's reference), each
   in a child process of its own as the two commands would run (``--in-process``: in this one).
   Each pays its own CUDA start, library loads and cuDNN autotuning: run in this process, the
   second inherited the first's (and the bare kernels') warm state, which favoured full-data
   scoring in the speedup.  Each stage is timed as it finishes; a ledger in the workspace adds the time an interrupted
   invocation spent in a stage to the invocation that finishes it, so a run split over several
   commands (``--workdir`` re-used; stage markers skip finished stages, epochs resume from their
   checkpoint) still reports whole-stage times.

Prints one table (stage, wall s, samples/s, bare-kernel figure, ratio, peak GPU memory, peak
host RSS) and writes it with everything measured as JSON to ``--out`` (re-written after every
section, so a killed run still leaves its numbers).  Every section runs under try/except: an
error is printed and the next section runs.

    python scripts/bench_gpu_e2e.py --n 100000 --epochs 30 --workdir /tmp/spb --out /tmp/spb/100k.json
    python scripts/bench_gpu_e2e.py --n 2000 --epochs 2 --no-full   # CPU smoke test
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ORDER = ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune")
NUM_CLASSES = 10
LABEL_NOISE = 0.05
SIZE = 32
KNN_K = 21
GCN_DEGREE = 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def section(name: str, results: dict):
    """A context that logs a section and records its error in ``results`` instead of raising.

    KeyboardInterrupt (Ctrl-C, or SIGTERM from ``timeout``) is recorded and propagates.
    """
    class _Section:
        def __enter__(self):
            log(f"== {name}")
            self.t0 = time.time()
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                log(f"== {name}: done in {time.time() - self.t0:.1f}s")
                return False
            if exc_type is KeyboardInterrupt:
                results.setdefault("errors", {})[name] = "interrupted"
                log(f"== {name}: interrupted after {time.time() - self.t0:.1f}s")
                return False  # propagate: the caller writes what it has and stops
            results.setdefault("errors", {})[name] = f"{exc_type.__name__}: {exc}"
            log(f"== {name}: FAILED after {time.time() - self.t0:.1f}s: {exc_type.__name__}: {exc}")
            traceback.print_exception(exc_type, exc, tb, limit=8)
            return True
    return _Section()


# ----------------------------------------------------------------------------- synthetic shards

def _palette(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(40, 216, size=(NUM_CLASSES, 3))


_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_STRIPES = ((_GRID[0] + _GRID[1]).astype(np.int64) // 3) % 2 == 0


def make_image(label: int, rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """A 32x32 RGB image: class shape in a class colour, jittered, on a noisy random background."""
    yy, xx = _GRID
    cy, cx = rng.uniform(10, 22, size=2)
    r = rng.uniform(6, 11)
    dy, dx = yy - cy, xx - cx
    shape = label % 5
    if shape == 0:
        m = dy * dy + dx * dx <= r * r  # disc
    elif shape == 1:
        m = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)  # square
    elif shape == 2:
        m = (dy <= r * 0.8) & (dy >= -r * 0.8) & (np.abs(dx) <= (dy + r * 0.8) * 0.6)  # triangle
    elif shape == 3:
        m = ((np.abs(dy) <= r / 4) | (np.abs(dx) <= r / 4)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)  # cross
    else:
        m = (dy * dy + dx * dx <= r * r) & (dy * dy + dx * dx >= (r * 0.55) ** 2)  # ring
    bg = rng.integers(0, 256, size=3).astype(np.float32)
    colour = palette[label].astype(np.float32) + rng.normal(0, 18, size=3)
    if label >= 5:  # classes 5..9 repeat the shapes of 0..4: striped fill tells them apart
        m = m & _STRIPES
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = bg * 0.6 + 50
    img[m] = colour
    img += rng.normal(0, 20, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _child_init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool workers are stopped with SIGTERM


def _write_shard(args: tuple) -> int:
    path, first, count, seed = args
    from streamprune.tario import write_tar

    palette = _palette(np.random.default_rng(seed))
    rng = np.random.default_rng([seed, first])
    samples = []
    for i in range(first, first + count):
        label = int(rng.integers(NUM_CLASSES))
        img = make_image(label, rng, palette)
        shown = label
        if rng.random() < LABEL_NOISE:
            shown = int((label + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES)
        samples.append((f"{i:09d}", {"png": _png(img), "cls": str(shown).encode()}))
    write_tar(path, samples)
    return count


def shard_plan(n: int, shard_size: int | None) -> list[tuple[int, int]]:
    """(first row, count) of every shard: ~64+ shards so every core gets work, at most 10k rows each."""
    size = shard_size or max(500, min(10_000, math.ceil(n / 64)))
    return [(s, min(size, n - s)) for s in range(0, n, size)]


def write_shards(directory: str, n: int, shard_size: int | None, seed: int, procs: int) -> tuple[list[str], float]:
    """Write the missing shards with ``procs`` processes; returns all shard paths and seconds spent."""
    os.makedirs(directory, exist_ok=True)
    plan = shard_plan(n, shard_size)
    paths = [os.path.join(directory, f"synth-{i:05d}.tar") for i in range(len(plan))]
    todo = [(p, first, count, seed) for p, (first, count) in zip(paths, plan) if not os.path.exists(p)]
    t0 = time.time()
    if todo:
        log(f"writing {len(todo)} of {len(paths)} shards ({sum(t[2] for t in todo)} samples) with {procs} processes")
        with mp.get_context("fork").Pool(procs, initializer=_child_init) as pool:
            for _ in pool.imap_unordered(_write_shard, todo):
                pass
    return paths, time.time() - t0


# ----------------------------------------------------------------------------- bare kernels

def _read_pngs(paths: list[str], limit: int) -> list[bytes]:
    out: list[bytes] = []
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    out.append(tar.extractfile(m).read())
                    if len(out) >= limit:
                        return out
    return out


def _decode_worker(args: tuple) -> tuple[int, float]:
    paths, limit = args
    from PIL import Image

    pngs = _read_pngs(paths, limit)
    t0 = time.perf_counter()
    for b in pngs:
        with Image.open(io.BytesIO(b)) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return len(pngs), time.perf_counter() - t0


def bare_decode(paths: list[str], procs: int, per_proc: int) -> dict:
    """PNG decode/s of all cores: each process decodes its own in-memory PNGs; rates add up."""
    groups = [paths[i::procs] for i in range(procs)]
    groups = [g for g in groups if g] or [paths]
    with mp.get_context("fork").Pool(len(groups), initializer=_child_init) as pool:
        res = pool.map(_decode_worker, [(g, per_proc) for g in groups])
    rates = [n / t for n, t in res if t > 0]
    return {"procs": len(groups), "images": int(sum(n for n, _ in res)), "per_core_per_s": float(np.mean(rates)),
            "decode_per_s": float(sum(rates))}


def _timed_loop(step, device, min_seconds: float, min_steps: int, warmup: int) -> tuple[int, float]:
    from streamprune.train import sync_device
    for _ in range(warmup):
        step()
    sync_device(device)
    t0 = time.perf_counter()
    steps = 0
    while steps < min_steps or time.perf_counter() - t0 < min_seconds:
        step()
        steps += 1
        if steps % 10 == 0:
            sync_device(device)
    sync_device(device)
    return steps, time.perf_counter() - t0


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def bare_train(device, batch: int, seconds: float, min_steps: int, profile_steps: int = 0) -> dict:
    """ResNet-18 (CIFAR stem) SGD steps on an in-memory uint8 tensor: bf16 autocast + channels_last on CUDA."""
    import torch
    import torch.nn.functional as F

    from streamprune.models import build_model

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model("resnet18", (3, SIZE, SIZE), NUM_CLASSES).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    pool = 8192 if cuda else 4 * batch
    x = torch.randint(0, 256, (pool, 3, SIZE, SIZE), dtype=torch.uint8, device=device)
    y = torch.randint(0, NUM_CLASSES, (pool,), device=device)
    state = {"i": 0}
    model.train()

    def step():
        i = state["i"]
        state["i"] = (i + batch) % (pool - batch)
        xb = x[i:i + batch].float().div_(255.0)
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(xb)
        loss = F.cross_entropy(out.float(), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _peak_reset(device)
    steps, t = _timed_loop(step, device, seconds, min_steps, warmup=10 if cuda else 1)
    out = {"batch": batch, "steps": steps, "seconds": round(t, 3), "img_per_s": steps * batch / t,
           "peak_gpu_gib": _peak(device)}
    if profile_steps:  # the same profile as the product's training steps (--profile-steps), to compare
        from torch.profiler import ProfilerActivity, profile

        from streamprune.train import profile_head, sync_device

        sync_device(device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            for _ in range(profile_steps):
                step()
            sync_device(device)
            wall = time.perf_counter() - t0
        out["profile"] = profile_head(prof.key_averages(), wall, profile_steps)
        log(f"bare train profile: {out['profile']}")
    return out


def bare_forward(device, batch: int, seconds: float, min_steps: int) -> dict:
    """ResNet-18 penultimate-layer forward (the embed pass) in bf16 autocast + channels_last on CUDA."""
    import torch

    from streamprune.models import build_model

    cuda = device.type == "cuda"
    model = build_model("resnet18", (3, SIZE, SIZE), NUM_CLASSES).to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, device=device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            xb = x.float().div_(255.0)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            model.embed(xb)

    _peak_reset(device)
    steps, t = _timed_loop(step, device, seconds, min_steps, warmup=5 if cuda else 1)
    return {"batch": batch, "steps": steps, "seconds": round(t, 3), "img_per_s": steps * batch / t,
            "peak_gpu_gib": _peak(device)}


def bare_knn(device, n: int, d: int, k: int, dtype: str, queries: int | None = None,
             block_bytes: int = 1 << 30) -> dict:
    """Exact kNN of n x d random vectors against themselves: |x|^2 - 2 q.x by matmul, topk per block.

    Only the first ``queries`` rows are searched (all n by default); the rate per query row is
    the same, so ``rows_per_s`` and ``full_seconds`` (projected for all n) stand for the whole.
    """
    import torch

    from streamprune.train import sync_device

    cuda = device.type == "cuda"
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    if not cuda and dt == torch.float16:
        dt = torch.float32  # CPU half matmul is not a meaningful figure
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((n, d), generator=g, device=device, dtype=torch.float32).to(dt)
    sq = (x.float() ** 2).sum(1).to(dt)
    block = max(1, min(8192, block_bytes // (x.element_size() * n)))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    _peak_reset(device)
    try:
        with torch.inference_mode():
            for b in range(0, min(n, block), block):  # warm-up block
                torch.addmm(sq[None, :], x[b:b + block], x.T, beta=1, alpha=-2).topk(k, dim=1, largest=False)
            sync_device(device)
            t0 = time.perf_counter()
            ids = None
            nq = min(n, queries or n)
            for b in range(0, nq, block):
                dist = torch.addmm(sq[None, :], x[b:min(nq, b + block)], x.T, beta=1, alpha=-2)
                ids = dist.topk(k, dim=1, largest=False).indices
            sync_device(device)
            t = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del ids
    return {"n": n, "d": d, "k": k, "queries": nq, "dtype": str(dt).replace("torch.", ""), "block": block,
            "seconds": round(t, 3), "rows_per_s": nq / t, "full_seconds": round(t * n / nq, 3),
            "tflops": 2 * nq * n * d / t / 1e12, "peak_gpu_gib": _peak(device)}


def bare_gcn(device, n: int, degree: int, in_dim: int, widths=(512, 256, 1), reps: int = 3) -> dict:
    """A 3-layer GCN forward: H <- relu(A @ (H W)) with A an n x n CSR of degree ``degree`` (float32)."""
    import torch

    from streamprune.train import sync_device

    g = torch.Generator(device=device).manual_seed(0)
    crow = torch.arange(0, n * degree + 1, degree, device=device, dtype=torch.int64)
    col = torch.randint(0, n, (n * degree,), generator=g, device=device)
    val = torch.full((n * degree,), 1.0 / degree, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        adj = torch.sparse_csr_tensor(crow, col, val, size=(n, n))
    x = torch.randn((n, in_dim), generator=g, device=device)
    ws = []
    prev = in_dim
    for w in widths:
        ws.append(torch.randn((prev, w), generator=g, device=device) / math.sqrt(prev))
        prev = w

    def forward():
        h = x
        for i, w in enumerate(ws):
            h = torch.sparse.mm(adj, h @ w)
            if i < len(ws) - 1:
                h = torch.relu(h)
        return h

    _peak_reset(device)
    with torch.inference_mode():
        forward()
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            forward()
        sync_device(device)
        t = (time.perf_counter() - t0) / reps
    return {"n": n, "edges": n * degree, "in_dim": in_dim, "widths": list(widths), "seconds": round(t, 4),
            "nodes_per_s": n / t, "peak_gpu_gib": _peak(device)}


# ----------------------------------------------------------------------------- resource sampling

class Sampler:
    """Background sampler: host RSS of this process and its children (together, and the product's
    process alone with its value when the stage began: one process runs every stage of a run, so
    a stage's peak includes what earlier stages left in it), device-wide GPU memory in use."""

    def __init__(self, device, interval: float = 0.5):
        self.device = device
        self.interval = interval
        self.peak_rss = self.peak_self = self.start_self = 0
        self.peak_gpu_used = 0
        self.on_tick = None
        self._self = None
        self.child_gpu_alloc = None  # torch's peak allocation in the child's last stage (GiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def follow(self, pid: int | None) -> None:
        """Count process ``pid`` (the child running the product) as "self" instead of this one."""
        if self._proc is None:
            return
        import psutil

        try:
            self._self = psutil.Process(pid) if pid else None
        except psutil.Error:
            self._self = None

    def rss(self) -> tuple[int, int]:
        """(this process and its children, the product's process) bytes resident."""
        if self._proc is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return peak, peak  # without psutil: this process's peak so far, not its current RSS
        try:
            own = (self._self or self._proc).memory_info().rss
        except Exception:  # noqa: BLE001 - the child may have exited
            own = 0
        total = self._proc.memory_info().rss
        for p in self._proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a child may exit while we look
                pass
        return total, own

    def gpu_used(self) -> int:
        if self.device.type != "cuda":
            return 0
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def reset(self) -> None:
        self.peak_rss, self.start_self = self.rss()
        self.peak_self = self.start_self
        self.peak_gpu_used = self.gpu_used()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                total, own = self.rss()
                self.peak_rss, self.peak_self = max(self.peak_rss, total), max(self.peak_self, own)
                self.peak_gpu_used = max(self.peak_gpu_used, self.gpu_used())
                if self.on_tick is not None:
                    self.on_tick()
            except Exception:  # noqa: BLE001 - sampling must never kill the benchmark
                pass

    def start(self) -> "Sampler":
        self.reset()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- the product

class Ledger:
    """Per-stage wall seconds accumulated over invocations (``WORKDIR/ws/bench-ledger.json``)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path) as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {"stages": {}, "inflight": None}
        prev = self.data.get("inflight")
        self.carry = float(prev["elapsed"]) if prev else 0.0  # time an interrupted invocation spent
        self.carry_from = prev
        self.lock = threading.Lock()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def inflight(self, after: str | None, since: float) -> None:
        """Record the time spent so far in the running stage (plus what an earlier run spent in it)."""
        with self.lock:
            self.data["inflight"] = {"after": after, "elapsed": round(self.carry + time.time() - since, 3)}
            self.save()

    def finish(self, name: str, wall: float, skipped: bool, extra: dict) -> dict:
        with self.lock:
            rec = self.data["stages"].get(name)
            if not skipped:
                carried = self.carry
                self.carry = 0.0
                rec = {"wall_s": round(wall + carried, 3), "this_run_s": round(wall, 3),
                       "carried_s": round(carried, 3), **extra}
                self.data["stages"][name] = rec
            self.data["inflight"] = None
            self.save()
            return rec or {}


def product(args, device, results: dict, write) -> None:
    """Run the pipeline (and full-data scoring) stage by stage, recording time and memory per stage."""
    import torch

    from streamprune.pipeline import RunConfig, run_pipeline

    shards = sorted(glob.glob(os.path.join(args.workdir, "shards", "*.tar")))
    ws_dir = os.path.join(args.workdir, "ws")
    os.makedirs(ws_dir, exist_ok=True)
    ledger = Ledger(os.path.join(args.workdir, "bench-ledger.json"))
    if ledger.carry:
        log(f"an earlier invocation was interrupted {ledger.carry:.0f}s into the stage after "
            f"{ledger.carry_from.get('after')!r}; that time is added to the stage that finishes it")
    sampler = Sampler(device).start()
    state = {"last": None, "since": time.time(), "n_ticks": 0}
    stages_out = results.setdefault("product", {}).setdefault("stages", {})

    def tick():
        state["n_ticks"] += 1
        if state["n_ticks"] % 10 == 0:  # every ~5 s
            ledger.inflight(state["last"], state["since"])

    sampler.on_tick = tick

    def echo(msg: str) -> None:
        print(msg, flush=True)
        # run_pipeline reports each stage as "<name> done in 1.2s" or "<name> skipped (done) in 0.0s"
        skipped = " skipped (done) in " in msg
        if not skipped and " done in " not in msg:
            return
        name, _, tail = msg.partition(" skipped (done) in " if skipped else " done in ")
        name = name.strip()
        now = time.time()
        try:  # the pipeline's own measure of the stage; ours (since the last stage) also counts imports
            wall = float(tail.strip().rstrip("s"))
        except ValueError:
            wall = now - state["since"]
        child_alloc, sampler.child_gpu_alloc = sampler.child_gpu_alloc, None
        extra = {"peak_gpu_alloc_gib": _peak(device) if args.in_process else child_alloc, "peak_gpu_used_gib":
                 round(sampler.peak_gpu_used / 2**30, 3) if device.type == "cuda" else None,
                 "peak_rss_gib": round(sampler.peak_rss / 2**30, 3),
                 "peak_rss_self_gib": round(sampler.peak_self / 2**30, 3),
                 "rss_self_start_gib": round(sampler.start_self / 2**30, 3)}
        rec = ledger.finish(name, wall, skipped, extra)
        if not rec:  # done before the ledger existed: the marker's own wall time (its last invocation only)
            mw = marker_wall(read_markers(ws_dir), name)
            rec = {"wall_s": mw, "from_marker": True} if mw is not None else {}
        if rec:
            stages_out[name] = rec | {"skipped_this_run": skipped}
        state["last"], state["since"] = name, now
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sampler.reset()
        write()

    cfg = RunConfig(scheduler=args.scheduler)
    s = cfg.stages
    s["subset"]["fraction"] = args.subset
    window = max(2, min(10, args.epochs))
    s["score"].update({"model": "resnet18", "epochs": args.epochs, "scores": ["du"], "window": window,
                       "device": args.device, "full": False, "batch_size": args.train_batch})
    s["extrapolate"]["methods"] = ["knn", "gcn"]
    want = [st for st in args.stages if st in ORDER]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(until: str) -> dict:
        """``run_pipeline`` up to ``until``: in a child process of its own (default), as a user's
        ``streamprune run`` or ``score --full`` runs, so each pays its own CUDA start, library loads
        and cuDNN autotuning and neither inherits the other's (or the bare kernels') warm state or
        memory; or in this process with ``--in-process``."""
        if args.in_process:
            return run_pipeline(shards, ws_dir, cfg, until=until, echo=echo)
        return run_child(shards, ws_dir, cfg, until, echo, sampler)
    try:
        if want:
            until = max(want, key=ORDER.index)
            log(f"pipeline until {until} over {len(shards)} shards, workspace {ws_dir}")
            state["since"] = time.time()
            try:
                out = run(until)
                results["product"]["pipeline_timings"] = out.get("timings")
            except Exception as exc:  # noqa: BLE001 - a failed stage must not cost the full-data run
                results.setdefault("errors", {})["pipeline"] = f"{type(exc).__name__}: {exc}"
                log(f"pipeline FAILED after stage {state['last']!r}: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=8)
            write()
        if "full" in args.stages and args.full:
            s["score"]["full"] = True
            log("full-data scoring (score --full)")
            state["since"], state["last"] = time.time(), None
            out = run("score")
            results["product"]["full_timings"] = out.get("timings")
            write()
    except BaseException:
        ledger.inflight(state["last"], state["since"])  # the next invocation adds this time to the stage
        raise
    finally:
        sampler.stop()
        for key in ("train", "train-full"):  # --profile-steps: the training step profiles, into the JSON
            path = os.path.join(ws_dir, key, "profile.txt")
            if os.path.exists(path):
                results.setdefault("profiles", {})[key] = open(path).read()
                log(f"{key} profile: {results['profiles'][key].splitlines()[0]}")


CHILD = r"""
import json, sys
import torch
from streamprune.pipeline import RunConfig, run_pipeline

def echo(m):
    if (" done in " in m or " skipped (done) in " in m) and torch.cuda.is_available() and torch.cuda.is_initialized():
        print("BENCH-GPU " + str(round(torch.cuda.max_memory_allocated() / 2**30, 3)), flush=True)  # the stage's peak
        torch.cuda.reset_peak_memory_stats()
    print(m, flush=True)

a = json.loads(sys.argv[1])
out = run_pipeline(a["shards"], a["ws"], RunConfig(stages=a["stages"], scheduler=a["scheduler"]), until=a["until"],
                   echo=echo)
print("BENCH-RESULT " + json.dumps({"timings": out.get("timings")}), flush=True)
"""


def run_child(shards: list[str], ws_dir: str, cfg, until: str, echo, sampler: Sampler) -> dict:
    """Run the pipeline in a child Python process, passing its stage lines to ``echo`` as they come
    (its stderr goes on to ours; the last line names a failure)."""
    import collections

    args = {"shards": shards, "ws": ws_dir, "stages": cfg.stages, "scheduler": cfg.scheduler, "until": until}
    # In this process's group: a timeout that signals the group reaches the child and its workers too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    sampler.follow(proc.pid)
    sampler.reset()  # the child's own RSS from its start, not this process's
    tail: collections.deque = collections.deque(maxlen=5)

    def tee() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())

    errors = threading.Thread(target=tee, daemon=True)
    errors.start()
    result: dict = {}
    try:
        for line in proc.stdout:
            if line.startswith("BENCH-RESULT "):
                result = json.loads(line[len("BENCH-RESULT "):])
            elif line.startswith("BENCH-GPU "):  # torch's peak allocation in the stage that ends next
                sampler.child_gpu_alloc = float(line.split()[1])
            else:
                echo(line.rstrip("\n"))
        if proc.wait() != 0:
            errors.join(timeout=5)
            raise RuntimeError(f"the pipeline's process exited with status {proc.returncode}"
                               + (f": {tail[-1]}" if tail else ""))
    finally:
        sampler.follow(None)
        if proc.poll() is None:  # interrupted: a terminal's Ctrl-C reached the child too; give it time
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # it closes its local cluster
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return result


def read_markers(ws_dir: str) -> dict:
    """Every stage marker of the workspace (counts and timings)."""
    out = {}
    for p in sorted(glob.glob(os.path.join(ws_dir, "_stages", "*.json"))):
        try:
            with open(p) as f:
                m = json.load(f)
            out[m.get("key", os.path.basename(p)[:-5])] = {"counts": m.get("counts", {}),
                                                          "timings": m.get("timings", {})}
        except (OSError, ValueError):
            pass
    return out


def marker_wall(markers: dict, stage: str, score: str = "du") -> float | None:
    """Wall seconds of a pipeline stage name (as run_pipeline prints it) from the workspace's markers."""
    if stage in ("score", "score-full"):
        keys = [f"score-{score}" + stage[5:]]
    elif stage == "index":
        keys = [k for k in markers if k.startswith("index-")]
    elif stage == "prune":
        keys = [k for k in markers if k.startswith("prune")]
    else:
        keys = [stage.replace(" ", "-")]
    walls = [markers[k]["timings"].get("wall_s") for k in keys if k in markers]
    walls = [w for w in walls if w is not None]
    return round(sum(walls), 3) if walls else None


def quality(ws_dir: str) -> dict:
    """Pearson/Spearman of extrapolated DU against full-data DU over the non-seed rows."""
    from scipy.stats import pearsonr, spearmanr

    from streamprune.extrapolate import read_extrapolated
    from streamprune.scoring import read_score
    from streamprune.workspace import Workspace

    ws = Workspace(ws_dir)
    if ws.marker("score-du-full") is None:
        return {}
    full = read_score(ws, "du", full=True)
    out = {}
    for method in ("knn", "gcn"):
        if ws.marker(f"extrapolate-du-{method}") is None:
            continue
        score_arr, source_arr = read_extrapolated(ws, "du", method)
        score, source = np.asarray(score_arr[:]), np.asarray(source_arr[:])
        sel = (source != 0) & np.isfinite(score) & np.isfinite(full)
        if sel.sum() > 2:
            out[method] = {"pearson": float(pearsonr(score[sel], full[sel])[0]),
                           "spearman": float(spearmanr(score[sel], full[sel])[0]), "rows": int(sel.sum())}
    return out


# ----------------------------------------------------------------------------- the table

def build_table(results: dict, n: int, epochs: int, subset: float) -> list[dict]:
    """One row per stage (and sub-phase): wall, samples/s, matching bare-kernel figure, ratio, memory."""
    stages = results.get("product", {}).get("stages", {})
    markers = results.get("markers", {})
    bare = results.get("bare", {})
    m_seed = markers.get("subset", {}).get("counts", {}).get("n_subset") or markers.get("train", {}).get(
        "counts", {}).get("n_rows") or int(round(n * subset))
    train_b = bare.get("train", {}).get("img_per_s")
    fwd_b = bare.get("forward", {}).get("img_per_s")
    dec_b = bare.get("decode", {}).get("decode_per_s")
    widths = sorted(int(key[5:]) for key in bare if key.startswith("knn_d") and key[5:].isdigit())
    knn_b = (bare.get("knn_product_dim") or (bare[f"knn_d{widths[-1]}"] if widths else {})).get("rows_per_s")
    gcn_b = bare.get("gcn", {}).get("nodes_per_s")
    rows: list[dict] = []

    def add(stage, wall, samples, bare_fig=None, bare_what="", src=None):
        rate = samples / wall if wall and samples else None
        rows.append({"stage": stage, "wall_s": round(wall, 2) if wall is not None else None,
                     "samples": samples, "samples_per_s": round(rate, 1) if rate else None,
                     "bare": round(bare_fig, 1) if bare_fig else None, "bare_what": bare_what,
                     "ratio": round(rate / bare_fig, 3) if rate and bare_fig else None,
                     "peak_gpu_alloc_gib": (src or {}).get("peak_gpu_alloc_gib"),
                     "peak_gpu_used_gib": (src or {}).get("peak_gpu_used_gib"),
                     "peak_rss_gib": (src or {}).get("peak_rss_gib"),
                     "peak_rss_self_gib": (src or {}).get("peak_rss_self_gib"),
                     "rss_self_start_gib": (src or {}).get("rss_self_start_gib")})

    def wall_of(name):
        return stages.get(name, {}).get("wall_s")

    for name in ("catalog", "subset"):
        if name in stages:
            add(name, wall_of(name), n, src=stages[name])
    for tag, rows_n in (("", m_seed), ("-full", n)):
        tn = f"train{tag}"
        if tn in stages:
            t = markers.get(tn, {}).get("timings", {})
            e = markers.get(tn, {}).get("counts", {}).get("epochs", epochs)
            add(tn, wall_of(tn), rows_n * e, train_b, "train img/s", stages[tn])
            if t.get("cache_s"):
                add(f"  {tn}: decode cache", t["cache_s"], rows_n, dec_b, "decode/s")
            if t.get("train_s"):
                add(f"  {tn}: epochs (+eval)", t["train_s"], rows_n * e, train_b, "train img/s")
            if t.get("steps_s"):  # the epochs' training steps alone, and their eval passes
                er = t.get("epochs_run", e)
                add(f"  {tn}: training steps", t["steps_s"], rows_n * er, train_b, "train img/s")
                if t.get("eval_s"):
                    add(f"  {tn}: eval passes", t["eval_s"], rows_n * er, fwd_b, "forward img/s")
        sn = f"score{tag}"
        if sn in stages:
            add(sn, wall_of(sn), rows_n, src=stages[sn])
    if "embed" in stages:
        lim = min(x for x in (fwd_b, dec_b) if x) if (fwd_b or dec_b) else None
        add("embed", wall_of("embed"), n, lim, "min(forward, decode)/s", stages["embed"])
        et = markers.get("embed", {}).get("timings", {})
        if et.get("path") == "client":  # the calling process encodes: its busy time against the stage's wall
            add("  embed: encode in this process", et.get("encode_s"), n, fwd_b, "forward img/s")
            add("    queuing copies + forwards (host)", et.get("encode_queue_s"), n)
            add("    waiting for the outputs (device)", et.get("encode_wait_s"), n)
            add("  embed: zarr writes (background thread)", et.get("write_s"), n)
            add("  embed: this process's loop busy (encode, checks)", et.get("client_s"), n)
    if "index" in stages:
        add("index", wall_of("index"), n, src=stages["index"])
        for g in ("seeds", "all"):
            mk = markers.get(f"index-{g}")
            if mk:
                n_index = mk["counts"].get("n_index") or n
                bare_g = knn_b * n / n_index if knn_b and n_index else None  # same flops: n x n_index
                add(f"  index-{g} ({mk['counts'].get('engine', 'faiss')}, {mk['counts'].get('factory')})",
                    mk["timings"].get("wall_s"), n, bare_g, f"exact kNN rows/s vs {n_index} rows")
    for name in stages:  # pipeline order
        if name.startswith("extrapolate"):
            is_gcn = name.endswith("gcn")
            add(name, wall_of(name), n, gcn_b if is_gcn else None, "GCN fwd nodes/s" if is_gcn else "", stages[name])
            mk = markers.get(name.replace("extrapolate ", "extrapolate-"), {})
            layers = [v.get("s", 0) for k_, v in mk.get("timings", {}).items() if k_.startswith("layer")]
            if is_gcn and mk.get("timings", {}).get("train_s"):
                add("  gcn: train", mk["timings"]["train_s"], None)
            resident = mk.get("timings", {}).get("resident")
            if is_gcn and resident:  # resident training's graph and features (the whole graph's when shared)
                add("  gcn: train graph build (host CSR, copy)", resident.get("graph_s"), n)
                add("  gcn: train features to the device", resident.get("features_s"), n)
            if is_gcn and layers:
                add("  gcn: layer-wise inference", sum(layers), n, gcn_b, "GCN fwd nodes/s")
            whole = mk.get("timings", {}).get("whole_graph")
            if is_gcn and whole and not whole.get("from_training"):
                add("  gcn: graph build (host CSR, copy)", whole.get("graph_s"), n)
                add("  gcn: features to the device", whole.get("features_s"), n)
                add("  gcn: whole-graph forward kernel", whole.get("kernel_s"), n, gcn_b, "GCN fwd nodes/s")
                add("  gcn: inference incl. reads, writes", whole.get("s"), n, gcn_b, "GCN fwd nodes/s")
    if "prune" in stages:
        add("prune", wall_of("prune"), n, src=stages["prune"])
    return rows


def summary(results: dict) -> dict:
    """Totals and the speedup of extrapolation over full-data scoring."""
    st = results.get("product", {}).get("stages", {})
    mk = results.get("markers", {})

    def w(name):
        return st.get(name, {}).get("wall_s") or 0.0

    out = {"pipeline_total_s": round(sum(v.get("wall_s", 0) for k, v in st.items()
                                         if not k.endswith("-full")), 2)}
    full = w("train-full") + w("score-full")
    if full and mk.get("score-du-full"):
        from streamprune.pipeline import DEFAULTS, graphs_for

        base = w("train") + w("score") + w("embed")
        for method in ("knn", "gcn"):
            ex = w(f"extrapolate du-{method}")
            # the graphs the method reads: the GCN's kNN prior (the default) reads the seeds graph too
            graph = graphs_for([method], DEFAULTS["extrapolate"]["gcn_prior"])
            ix = sum((mk.get(f"index-{g}") or {}).get("timings", {}).get("wall_s") or 0.0
                     for g in (("seeds", "all") if graph == "both" else (graph,)))
            if ex:
                out[f"speedup_{method}"] = round(full / (base + ix + ex), 3)
        out["full_scoring_s"] = round(full, 2)
    return out


def print_table(rows: list[dict], summ: dict) -> None:
    hdr = f"{'stage':<44}{'wall s':>10}{'samples/s':>13}{'bare':>13}  {'bare figure':<34}{'ratio':>7}" \
          f"{'GPU alloc':>10}{'GPU used':>10}{'RSS GiB':>9}{'self':>7}{'at start':>9}"
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt):
        return format(v, fmt) if v is not None else format("-", fmt[:fmt.index(".")].replace(",", ""))

    for r in rows:
        print(f"{r['stage'][:43]:<44}{f(r['wall_s'], '>10.1f')}{f(r['samples_per_s'], '>13,.0f')}"
              f"{f(r['bare'], '>13,.0f')}  {r['bare_what'][:33]:<34}{f(r['ratio'], '>7.3f')}"
              f"{f(r['peak_gpu_alloc_gib'], '>10.2f')}{f(r['peak_gpu_used_gib'], '>10.2f')}"
              f"{f(r['peak_rss_gib'], '>9.2f')}{f(r.get('peak_rss_self_gib'), '>7.2f')}"
              f"{f(r.get('rss_self_start_gib'), '>9.2f')}")
    for k, v in summ.items():
        print(f"{k}: {v}")


# ----------------------------------------------------------------------------- main

_MAIN_PID = os.getpid()


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked pool worker being stopped: just exit
        os._exit(0)
    raise KeyboardInterrupt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="samples")
    p.add_argument("--subset", type=float, default=0.2, help="seed subset fraction")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (subset and full; >= 2 for DU)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="also run full-data scoring (score --full) for the speedup and fidelity")
    p.add_argument("--workdir", default=None, help="shards, workspace, ledger (default /tmp/spbench-N)")
    p.add_argument("--out", default=None, help="JSON output (default WORKDIR/bench-N.json)")
    p.add_argument("--skip-bare", action="store_true", help="skip the bare kernels")
    p.add_argument("--redo-bare", action="store_true", help="re-measure bare kernels kept from an earlier run")
    p.add_argument("--stages", default=",".join(ORDER + ("full",)),
                   help="product stages to run (pipeline runs up to the last listed; 'full' = score --full)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (training device of the product)")
    p.add_argument("--scheduler", default="local", help="dask scheduler of the product (local | threads | sync)")
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: ~n/64, 500..10000)")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="processes for shards and decode")
    p.add_argument("--bare-seconds", type=float, default=5.0, help="seconds per bare throughput figure")
    p.add_argument("--train-batch", type=int, default=None,
                   help="training batch of the bare kernel and the product (default 512 on CUDA: at 32 px a batch "
                        "of 128 leaves an H100 idle; 128 on the CPU, the product's default)")
    p.add_argument("--knn-dims", default="128,512", help="widths of the bare kNN (512 = resnet18's embedding)")
    p.add_argument("--knn-queries", type=int, default=65536,
                   help="query rows timed by the bare kNN (against all n rows; the rate is projected to n)")
    p.add_argument("--progress", action="store_true", help="show the product's progress bars")
    p.add_argument("--in-process", action="store_true",
                   help="run the pipeline and full-data scoring in this process (default: a child process "
                        "each, as separate commands run)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many training steps (STREAMPRUNE_PROFILE_STEPS): per-step wall and device "
                        "time and op tables, in the JSON under 'profiles'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in ORDER + ("full",)]
    if bad:
        p.error(f"--stages: unknown {bad}; choose from {', '.join(ORDER + ('full',))}")
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (DU needs a window of at least 2 epochs)")
    args.workdir = os.path.abspath(args.workdir or f"/tmp/spbench-{args.n}")
    args.out = os.path.abspath(args.out or os.path.join(args.workdir, f"bench-{args.n}.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.progress:
        os.environ["STREAMPRUNE_PROGRESS"] = "0"
    if args.profile_steps:
        from streamprune.train import PROFILE_ENV

        os.environ[PROFILE_ENV] = str(args.profile_steps)
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results: dict = {"args": {k: v for k, v in vars(args).items()}, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "host": {"cpus": os.cpu_count()}}

    def write() -> None:
        try:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, default=str)
            os.replace(tmp, args.out)
        except OSError as exc:
            log(f"cannot write {args.out}: {exc}")

    # SIGTERM (e.g. `timeout`) behaves like Ctrl-C: sections stop, the table is still printed and written.
    signal.signal(signal.SIGTERM, _on_sigterm)
    interrupted = False
    try:
        with section("shards", results):
            paths, secs = write_shards(os.path.join(args.workdir, "shards"), args.n, args.shard_size, args.seed,
                                       args.procs)
            results["shards"] = {"n_shards": len(paths), "seconds_this_run": round(secs, 2),
                                 "bytes": int(sum(os.path.getsize(p) for p in paths))}
            if secs:
                results["shards"]["samples_per_s"] = round(args.n / secs, 1)
            write()

        bare_path = os.path.join(args.workdir, f"bare-{args.n}.json")
        bare: dict = {}
        if not args.skip_bare and os.path.exists(bare_path) and not args.redo_bare:
            with open(bare_path) as f:
                bare = json.load(f)
            log(f"bare kernels: re-using {bare_path} (--redo-bare to measure again)")
        results["bare"] = bare

        def save_bare():
            with open(bare_path, "w") as f:
                json.dump(bare, f, indent=1)
            write()

        if not args.skip_bare and "decode" not in bare:
            with section("bare: PNG decode", results):
                paths = sorted(glob.glob(os.path.join(args.workdir, "shards", "*.tar")))
                per = max(200, min(20_000, args.n // max(1, args.procs)))
                bare["decode"] = bare_decode(paths, args.procs, per)
                log(f"decode: {bare['decode']['decode_per_s']:,.0f}/s on {bare['decode']['procs']} processes")
                save_bare()

        import torch

        device = torch.device("cuda" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
        results["device"] = {"type": device.type, "torch": torch.__version__,
                             "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                             "total_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
                             if device.type == "cuda" else None}
        log(f"device: {results['device']}")
        cuda = device.type == "cuda"
        if args.train_batch is None:
            args.train_batch = 512 if cuda else 128
        results["args"]["train_batch"] = args.train_batch
        secs = args.bare_seconds if cuda else 0.0
        if not args.skip_bare:
            if "train" not in bare:
                with section("bare: resnet18 train", results):
                    # CPU (smoke test): a small batch, the figure only shows the code runs
                    bare["train"] = bare_train(device, args.train_batch if cuda else 16, secs, 20 if cuda else 2,
                                              args.profile_steps)
                    if cuda and args.train_batch != 128:
                        bare["train_b128"] = bare_train(device, 128, secs, 10)  # the product's default batch
                    log(f"train: {bare['train']['img_per_s']:,.1f} img/s at batch {bare['train']['batch']}")
                    save_bare()
            if "forward" not in bare:
                with section("bare: resnet18 forward", results):
                    bare["forward"] = bare_forward(device, 1024 if cuda else 64, secs, 10 if cuda else 2)
                    log(f"forward: {bare['forward']['img_per_s']:,.0f} img/s")
                    save_bare()
            for d in [int(x) for x in args.knn_dims.split(",") if x.strip()]:
                key = f"knn_d{d}"
                if key in bare:
                    continue
                with section(f"bare: exact kNN n={args.n} d={d}", results):
                    bare[key] = bare_knn(device, args.n, d, KNN_K, "float16", args.knn_queries)
                    log(f"knn d={d}: {bare[key]['rows_per_s']:,.0f} rows/s ({bare[key]['full_seconds']:.2f}s for all "
                        f"{args.n}), {bare[key]['tflops']:.1f} TFLOP/s")
                    if d == 512:  # the product's engine: TF32 matmul over float32 vectors
                        bare["knn_d512_tf32"] = bare_knn(device, args.n, d, KNN_K, "float32", args.knn_queries)
                        bare["knn_product_dim"] = bare[key]
                    save_bare()
            if "gcn" not in bare:
                with section(f"bare: GCN forward n={args.n}", results):
                    bare["gcn"] = bare_gcn(device, args.n, GCN_DEGREE, 512 + NUM_CLASSES)
                    log(f"gcn: {bare['gcn']['seconds']:.3f}s per forward, {bare['gcn']['nodes_per_s']:,.0f} nodes/s")
                    save_bare()
            if cuda:
                torch.cuda.empty_cache()

        with section("product", results):
            product(args, device, results, write)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured")
    finally:
        ws_dir = os.path.join(args.workdir, "ws")
        try:
            results["markers"] = read_markers(ws_dir)
        except Exception as exc:  # noqa: BLE001
            results.setdefault("errors", {})["markers"] = repr(exc)
        try:
            results["quality"] = quality(ws_dir)
        except Exception as exc:  # noqa: BLE001
            results.setdefault("errors", {})["quality"] = repr(exc)
        try:
            rows = build_table(results, args.n, args.epochs, args.subset)
            summ = summary(results)
            results["table"], results["summary"] = rows, summ
            print()
            print(f"streamprune end-to-end, N={args.n}, subset {args.subset}, {args.epochs} epochs, "
                  f"device {results.get('device', {}).get('name')}, {os.cpu_count()} cores")
            print_table(rows, summ)
            if results.get("quality"):
                print(f"fidelity vs full-data DU (non-seed rows): {results['quality']}")
            if results.get("errors"):
                print(f"errors: {results['errors']}")
        except Exception as exc:  # noqa: BLE001
            results.setdefault("errors", {})["table"] = repr(exc)
            traceback.print_exc()
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        results["interrupted"] = interrupted
        write()
        log(f"wrote {args.out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

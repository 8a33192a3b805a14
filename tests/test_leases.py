"""Stage leases: one run of a stage per workspace at a time, taken over when its holder is gone."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from streamprune import leases
from streamprune.errors import StreamPruneError
from streamprune.shards import catalog
from streamprune.subset import subset
from streamprune.workspace import Workspace
from helpers import run_cli

# A process that begins the subset stage and holds it until its stdin closes (or it is killed).
HOLDER = textwrap.dedent("""
    import sys
    from streamprune.workspace import Workspace
    ws = Workspace(sys.argv[1])
    run = ws.begin("subset", {"fraction": 0.5, "seed": 1}, {"catalog": ws.marker("catalog")["fingerprint"]})
    if len(sys.argv) > 2:
        run.mark_chunk(sys.argv[2])
    print("holding", flush=True)
    sys.stdin.read()
""")


def _hold_subset(ws: str, *chunk: str) -> subprocess.Popen:
    """A process holding the subset stage (having recorded ``chunk``, if given) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, ws, *chunk], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_run_of_a_stage_is_refused_while_the_first_runs(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    holder = _hold_subset(ws)
    try:
        lease_file = os.path.join(ws, "_stages", "subset.lease")
        info = json.load(open(lease_file))
        assert info["pid"] == holder.pid
        proc = run_cli("subset", "-w", ws, "--fraction", "0.3", "--force", check=False)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"subset: another run of this stage is using the workspace (pid {holder.pid} on host" in lines[0]
        with pytest.raises(StreamPruneError, match="another run of this stage"):
            subset(ws, fraction=0.5, seed=1)
        assert not os.path.exists(os.path.join(ws, "_stages", "subset.json"))  # neither run wrote a marker
        assert json.load(open(lease_file))["token"] == info["token"]  # the refused runs left the lease alone
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed on this host: its lease is taken over at once, and the stage runs.
    t0 = time.time()
    m = subset(ws, fraction=0.5, seed=1)
    assert time.time() - t0 < leases.LEASE_S / 4 and m["counts"]["n_subset"] > 0
    assert not os.path.exists(os.path.join(ws, "_stages", "subset.lease"))  # released at commit


def test_a_holder_that_finishes_releases_its_lease_and_the_next_run_skips(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    code = HOLDER.replace('sys.stdin.read()', 'sys.stdin.read()\nrun.commit(outputs={}, counts={"n_subset": 7})')
    proc = subprocess.Popen([sys.executable, "-c", code, ws], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    proc.stdin.close()
    assert proc.wait(60) == 0
    assert not os.path.exists(os.path.join(ws, "_stages", "subset.lease"))
    assert subset(ws, fraction=0.5, seed=1)["counts"]["n_subset"] == 7  # its marker, skipped


def _foreign(renewed: float) -> bytes:
    return json.dumps({"token": "t-other", "what": "subset", "where": "elsewhere/pid:[1]", "pid": 4242,
                       "started": renewed, "renewed": renewed}).encode()


def test_a_lease_of_another_host_is_honoured_until_it_expires(shards, tmp_path, caplog):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    lease_file = os.path.join(ws, "_stages", "subset.lease")
    with open(lease_file, "wb") as f:
        f.write(_foreign(time.time() - 5))
    with pytest.raises(StreamPruneError, match=r"pid 4242 on host elsewhere, started .*, renewed 5 s ago"):
        subset(ws, fraction=0.5, seed=1)
    with open(lease_file, "wb") as f:
        f.write(_foreign(time.time() - leases.LEASE_S - 1))  # not renewed for LEASE_S: its machine is gone
    with caplog.at_level("WARNING", logger="streamprune.leases"):
        assert subset(ws, fraction=0.5, seed=1)["counts"]["n_subset"] > 0
    assert "taking over a stale lease (pid 4242 on host elsewhere" in caplog.text
    assert not os.path.exists(lease_file)


def test_a_damaged_lease_is_stale():
    assert leases.is_stale({}) and leases.is_stale({"renewed": "x", "pid": 1})


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b'{"token": "abc", "pi', b"[1, 2]"])
def test_a_damaged_lease_file_does_not_block_the_stage(shards, tmp_path, caplog, content):
    """A lease file that is not a JSON object (bytes of a dying disk, a write cut short) is stale: the next run
    takes it over with a warning and runs, instead of waiting for a holder that does not exist."""
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    lease_file = tmp_path / "ws" / "_stages" / "subset.lease"
    lease_file.write_bytes(content)
    with caplog.at_level("WARNING", logger="streamprune.leases"):
        m = subset(ws, fraction=0.5, seed=1)
    assert not m.get("skipped") and Workspace(ws).marker("subset")["fingerprint"] == m["fingerprint"]
    assert "subset: taking over a stale lease" in caplog.text
    assert not lease_file.exists()


def test_a_run_that_lost_its_lease_records_nothing_more(shards, tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    catalog(shards, ws.url, scheduler="sync")
    run = ws.begin("subset", {"fraction": 0.5, "seed": 1}, {"catalog": ws.marker("catalog")["fingerprint"]})
    try:
        run.mark_chunk("a")
        run.lease.renew()  # still ours: renewed
        assert run.lease.lost_to is None
        with open(run.lease.url, "wb") as f:  # another run took it over while this one stalled
            f.write(_foreign(time.time()))
        run.lease.renew()
        with pytest.raises(StreamPruneError, match="another run took this stage over .*pid 4242"):
            run.mark_chunk("b")
        with pytest.raises(StreamPruneError, match="another run took this stage over"):
            run.commit(outputs={}, counts={})
        assert run.done_chunks() == {"a"} and ws.marker("subset") is None
    finally:
        leases.release(run.lease)
    assert os.path.exists(run.lease.url)  # the new holder's lease stays


def test_a_release_before_the_renewal_noticed_a_takeover_leaves_the_new_holders_lease(tmp_path):
    """A run that stalled, was taken over and then ends before a renewal told it so must not remove
    the lease of the run that took its stage over."""
    url = str(tmp_path / "_stages" / "embed.lease")
    held = leases.acquire(url, "embed")
    with open(url, "wb") as f:  # taken over while this run stalled; no renewal has run since
        f.write(_foreign(time.time()))
    assert held.lost_to is None
    leases.release(held)
    assert json.load(open(url))["token"] == "t-other"


def test_a_stage_that_fails_gives_its_lease_back(shards, tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    catalog(shards, ws.url, scheduler="sync")

    @leases.releases_leases
    def failing_stage():
        run = ws.begin("subset", {"fraction": 0.5, "seed": 1}, {"catalog": ws.marker("catalog")["fingerprint"]})
        assert os.path.exists(ws.path("_stages", "subset.lease"))
        run.mark_chunk("a")
        run.mark_chunk("b")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_stage()
    assert not os.path.exists(ws.path("_stages", "subset.lease")) and not leases.held()
    from streamprune.status import status

    info = status(ws)
    assert info["interrupted"] == {"subset": "2 chunks recorded"} and not info["running"]
    assert "subset" not in info["pending"]


def _commit_many(ws_url: str, worker: int, n: int, go) -> None:
    ws = Workspace(ws_url)
    go.wait(60)
    for i in range(n):
        run = ws.begin("score", {"score": f"s{worker}-{i}"}, {}, key=f"score-w{worker}-{i}")
        run.commit(outputs={}, counts={}, errors=[{"key": f"k{worker}-{i}", "reason": "bad"}])


def test_concurrent_commits_of_different_stages_lose_nothing(tmp_path):
    """streamprune.json and errors.jsonl are rewritten by every commit: one at a time across processes."""
    ws = str(tmp_path / "ws")
    workers, n = 4, 12
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_commit_many, args=(ws, w, n, go)) for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(3)  # all imported
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    wsobj = Workspace(ws)
    expected = {f"score-w{w}-{i}" for w in range(workers) for i in range(n)}
    assert set(wsobj.metadata()["stages"]) == expected
    assert {e["key"] for e in wsobj.errors()} == {f"k{w}-{i}" for w in range(workers) for i in range(n)}
    assert set(wsobj.markers()) == expected
    assert not [f for f in os.listdir(os.path.join(ws, "_stages")) if f.endswith(".lease")]


def test_leases_on_s3_use_conditional_creates(s3server, s3bucket):
    opts = s3server.storage_options
    url = f"s3://{s3bucket}/ws/_stages/embed.lease"
    held = leases.acquire(url, "embed", opts)
    try:
        fs = s3server.fs()
        info = json.loads(fs.cat_file(url))
        assert info["token"] == held.token and info["pid"] == os.getpid()
        # another host's run: the store refuses its conditional create, and it reads the holder
        assert leases._create(url, b"{}", opts) is False
        assert json.loads(fs.cat_file(url))["token"] == held.token
        fs.pipe_file(url, _foreign(time.time()))  # taken over while this process stalled
        held.renew()
        assert held.lost_to["pid"] == 4242
        with pytest.raises(StreamPruneError, match="pid 4242 on host elsewhere"):
            leases.acquire(url, "embed", opts)
    finally:
        leases.release(held)
    assert fs.exists(url)  # the other holder's lease is not removed
    fs.rm(url)
    again = leases.acquire(url, "embed", opts)
    leases.release(again)
    assert not fs.exists(url)


def test_status_shows_a_running_stage(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    holder = _hold_subset(ws, "chunk-a")
    try:
        out = run_cli("status", "-w", ws).stdout
        assert "running  subset" in out and f"pid {holder.pid} on host" in out and "1 chunk recorded" in out
        assert "pending  subset" not in out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out = run_cli("status", "-w", ws).stdout
    assert "running  subset" not in out  # its holder is dead
    assert "stopped  subset" in out and "1 chunk recorded by pid" in out and "its next run resumes it" in out


def _exit_normally(held) -> int:
    """A forked worker that returns normally: its exit releases what it holds (nothing)."""
    code = 0 if not leases.held() else 1
    leases._release_all()
    return code


def _commit_in_child(held) -> int:
    """A forked worker that finishes the run it was handed (StageRun.commit releases the lease)."""
    leases.release(held)
    return 0


@pytest.mark.parametrize("child", [_exit_normally, _commit_in_child])
def test_a_forked_child_never_releases_its_parents_lease(tmp_path, child):
    url = str(tmp_path / "_stages" / "embed.lease")
    held = leases.acquire(url, "embed")
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(child(held))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert json.load(open(url))["token"] == held.token
    finally:
        leases.release(held)
    assert not os.path.exists(url)


def test_leases_work_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    url = str(tmp_path / "_stages" / "embed.lease")
    held = leases.acquire(url, "embed")
    try:
        assert json.load(open(url))["token"] == held.token
        assert leases._create(url, b"{}", None) is False  # exclusive all the same
        assert [p.name for p in (tmp_path / "_stages").iterdir()] == ["embed.lease"]  # no temporary file left
    finally:
        leases.release(held)
    assert not os.path.exists(url)


def test_a_renewal_that_overlaps_the_release_does_not_bring_the_lease_back(tmp_path, monkeypatch):
    """The renewal thread takes its list of leases, then renews each: a stage that commits meanwhile
    must not find its lease written back, held by a live process that no longer renews it."""
    url = str(tmp_path / "_stages" / "embed.lease")
    held = leases.acquire(url, "embed")
    leases.release(held)
    held.renew()  # listed before the release, renewed after it
    assert not os.path.exists(url)

    held = leases.acquire(url, "embed")
    real_read = leases.read
    releaser = threading.Thread(target=leases.release, args=(held,))

    def read_then_release(u, storage_options=None):
        info = real_read(u, storage_options)
        if not releaser.is_alive() and threading.current_thread() is threading.main_thread():
            releaser.start()  # the stage commits between the renewal's read and its write
            releaser.join(0.5)
        return info

    monkeypatch.setattr(leases, "read", read_then_release)
    held.renew()
    releaser.join(10)
    monkeypatch.setattr(leases, "read", real_read)
    assert not os.path.exists(url) and held.released


def test_a_stage_running_in_another_thread_of_this_process_keeps_its_lease(shards, tmp_path):
    """Two threads of one process (a notebook, a service) running one stage: the second is refused,
    as a second process would be, instead of taking over the first one's lease."""
    ws = Workspace(str(tmp_path / "ws"))
    catalog(shards, ws.url, scheduler="sync")
    inputs = {"catalog": ws.marker("catalog")["fingerprint"]}
    begun, finish, runs = threading.Event(), threading.Event(), []

    def first():
        runs.append(ws.begin("subset", {"fraction": 0.5, "seed": 1}, inputs))
        begun.set()
        finish.wait(30)
        leases.release(runs[0].lease)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert begun.wait(30)
        token = json.load(open(runs[0].lease.url))["token"]
        with pytest.raises(StreamPruneError, match=f"another run of this stage .*pid {os.getpid()} on host"):
            ws.begin("subset", {"fraction": 0.3, "seed": 1}, inputs, force=True)
        assert json.load(open(runs[0].lease.url))["token"] == token
    finally:
        finish.set()
        t.join(30)
    # a lease of this process that no live thread holds was left behind: taken over
    left = Workspace(ws.url).begin("subset", {"fraction": 0.5, "seed": 1}, inputs)
    try:
        abandoned = threading.Thread(target=lambda: leases.acquire(ws.path("_stages", "x.lease"), "x"))
        abandoned.start()
        abandoned.join()
        assert leases.acquire(ws.path("_stages", "x.lease"), "x").thread is threading.current_thread()
    finally:
        for lease in leases.held():
            leases.release(lease)
    assert left.lease.released


def test_a_create_refused_for_a_lease_gone_a_moment_later_is_tried_again(s3server, s3bucket):
    """Runs taking over one stale lease at once remove and create it: a run's create-if-absent can be
    refused (412) for a lease that is gone when it looks again.  The run tries again, and does not
    fail with the store's refusal."""
    from faultproxy import FaultProxy

    url = f"s3://{s3bucket}/ws/_stages/subset.lease"
    with FaultProxy(s3server.endpoint_url) as proxy:
        opts = proxy.storage_options(s3server.storage_options)
        proxy.set(status=412, code="PreconditionFailed", first=1, match="subset.lease")
        lease = leases.acquire(url, "subset", opts)
        try:
            assert proxy.faults == 1 and proxy.log[0][0] == "PUT"
            assert leases.read(url, opts)["token"] == lease.token
        finally:
            leases.release(lease)


def _race_for_stale_lease(url: str, storage_options: dict | None, contenders: int) -> list:
    """``contenders`` runs (threads of this process) taking over one stale lease at once; the leases they got."""
    barrier, done = threading.Barrier(contenders), threading.Barrier(contenders)
    got, errors = [], []

    def contend():
        barrier.wait(30)
        try:
            got.append(leases.acquire(url, "subset", storage_options))
        except StreamPruneError as exc:
            errors.append(str(exc))
        done.wait(60)  # the winner's thread stays alive (holding) until every contender has decided

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) + len(errors) == contenders, errors
    assert all("another run of this stage" in e for e in errors), errors
    return got


def test_runs_taking_over_one_stale_lease_at_once_let_one_through(tmp_path):
    """Each run removes the stale lease only while it is unchanged (a check followed by a plain
    remove could remove the lease another run had just created in its place, and both would run),
    and a lease this process is creating counts as held by it."""
    url = str(tmp_path / "_stages" / "subset.lease")
    os.makedirs(os.path.dirname(url))
    for _ in range(20):
        with open(url, "wb") as f:
            f.write(_foreign(time.time() - leases.LEASE_S - 1))
        got = _race_for_stale_lease(url, None, 6)
        try:
            assert len(got) == 1, [g.token for g in got]
            assert json.load(open(url))["token"] == got[0].token
        finally:
            for lease in got:
                leases.release(lease)


def test_runs_taking_over_one_stale_lease_on_s3_let_one_through(s3server, s3bucket):
    opts = s3server.storage_options
    url = f"s3://{s3bucket}/ws/_stages/subset.lease"
    fs = s3server.fs()
    for _ in range(5):
        fs.pipe_file(url, _foreign(time.time() - leases.LEASE_S - 1))
        got = _race_for_stale_lease(url, opts, 6)
        try:
            assert len(got) == 1, [g.token for g in got]
            assert json.loads(fs.cat_file(url))["token"] == got[0].token
        finally:
            for lease in got:
                leases.release(lease)


def test_status_leaves_out_a_lease_being_written(shards, tmp_path):
    """A lease is written to a temporary file first (``.tmp-<id>-subset.lease``, left behind by a
    run killed at that moment): status does not list it as a stage."""
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    with open(os.path.join(ws, "_stages", ".tmp-0123abcd-subset.lease"), "wb") as f:
        f.write(_foreign(time.time()))
    out = run_cli("status", "-w", ws).stdout
    assert ".tmp" not in out and "running" not in out and "stopped" not in out, out


def test_status_ignores_a_lease_left_behind_by_a_finished_stage(shards, tmp_path):
    """A run killed between writing its marker and releasing its lease: the stage is done, not stopped."""
    from streamprune.status import status

    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=1)
    with open(os.path.join(ws, "_stages", "subset.lease"), "wb") as f:
        f.write(_foreign(time.time() - leases.LEASE_S - 1))
    info = status(ws)
    assert info["stages"]["subset"]["done"] and not info["interrupted"] and not info["running"]


def test_a_run_that_finds_the_stage_finished_once_it_holds_the_lease_gives_it_back(tmp_path, monkeypatch):
    """Another run committed the stage between this run's first look at its marker and taking the lease:
    this run skips the stage and gives the lease back, so that the stage's next run is not refused."""
    ws = Workspace(str(tmp_path / "ws"))
    done = ws.begin("s", {"a": 1}, {}).commit({}, {})
    real, looks = Workspace.marker, []

    def first_look_before_the_commit(self, stage, **kwargs):
        looks.append(stage)
        return None if len(looks) == 1 else real(self, stage, **kwargs)

    monkeypatch.setattr(Workspace, "marker", first_look_before_the_commit)
    run = ws.begin("s", {"a": 1}, {})
    assert run.already_done and run.previous["run"] == done["run"] and len(looks) == 2
    assert not leases.held() and not os.path.exists(ws.path("_stages", "s.lease"))


def test_a_live_lease_of_another_host_with_this_process_id_is_not_taken_over(tmp_path):
    """Process ids repeat across hosts (containers all start from pid 1): a lease naming this pid on
    another host is another run's, live until it expires."""
    url = str(tmp_path / "_stages" / "embed.lease")
    os.makedirs(os.path.dirname(url))
    other = dict(json.loads(_foreign(time.time())), pid=os.getpid())
    with open(url, "w") as f:
        json.dump(other, f)
    with pytest.raises(StreamPruneError, match=f"another run of this stage .*pid {os.getpid()} on host elsewhere"):
        leases.acquire(url, "embed")
    assert json.load(open(url))["token"] == "t-other"


def test_a_create_that_another_run_overwrote_at_once_is_not_held(tmp_path, monkeypatch):
    """A store that ignores create-if-absent: the lease is read back after creating it, and a run whose
    lease another run's create replaced at once does not hold it."""
    url = str(tmp_path / "_stages" / "embed.lease")
    os.makedirs(os.path.dirname(url))

    def overwritten_at_once(u, data, storage_options):
        with open(u, "wb") as f:
            f.write(_foreign(time.time()))
        return True

    monkeypatch.setattr(leases, "_create", overwritten_at_once)
    with pytest.raises(StreamPruneError, match="another run of this stage .*pid 4242"):
        leases.acquire(url, "embed")
    assert not leases.held()


RENEWING = textwrap.dedent("""
    import json, sys, time
    from streamprune import leases
    leases.RENEW_S = 0.05
    held = leases.acquire(sys.argv[1], "embed")
    first = json.load(open(sys.argv[1]))["renewed"]
    deadline = time.time() + 30
    while json.load(open(sys.argv[1]))["renewed"] == first and time.time() < deadline:
        time.sleep(0.05)
    print("renewed" if json.load(open(sys.argv[1]))["renewed"] > first else "not renewed")
""")


def test_a_held_lease_is_renewed_while_its_run_goes_on(tmp_path):
    """The holding process rewrites its lease's renewal time in the background: a run longer than
    LEASE_S keeps its stage instead of being taken over as stale."""
    url = str(tmp_path / "_stages" / "embed.lease")
    out = subprocess.run([sys.executable, "-c", RENEWING, url], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "renewed", out.stderr


def test_a_lease_is_created_only_where_none_is(tmp_path):
    url = str(tmp_path / "_stages" / "embed.lease")
    assert leases._create(url, _foreign(time.time()), None) is True
    assert leases._create(url, b"{}", None) is False
    assert json.load(open(url))["token"] == "t-other"
    assert [p.name for p in (tmp_path / "_stages").iterdir()] == ["embed.lease"]


def test_a_stale_lease_on_s3_replaced_meanwhile_is_not_removed(s3server, s3bucket):
    """The delete of a stale lease is conditional on the ETag it was read with: a lease created in its
    place meanwhile (by a run that took it over first) stays."""
    opts = s3server.storage_options
    url = f"s3://{s3bucket}/ws/_stages/subset.lease"
    fs = s3server.fs()
    fs.pipe_file(url, _foreign(time.time() - leases.LEASE_S - 1))
    info, etag = leases._read_tagged(url, opts)
    assert leases.is_stale(info) and etag
    fs.pipe_file(url, _foreign(time.time()))  # another run took it over first
    leases._remove_stale(url, info, etag, opts)
    assert json.loads(fs.cat_file(url))["renewed"] > info["renewed"]


def test_a_create_refused_with_an_unknown_answer_while_the_lease_exists_names_its_holder(s3server, s3bucket):
    """A store that refuses the conditional create with an answer other than 412 or 409: the lease is
    there, so the run is refused naming its holder, not with the store's answer."""
    from faultproxy import FaultProxy

    url = f"s3://{s3bucket}/ws/_stages/subset.lease"
    s3server.fs().pipe_file(url, _foreign(time.time()))
    with FaultProxy(s3server.endpoint_url) as proxy:
        opts = proxy.storage_options(s3server.storage_options)
        proxy.set(status=400, code="InvalidRequest", first=1, match="subset.lease")
        with pytest.raises(StreamPruneError, match="another run of this stage .*pid 4242 on host elsewhere"):
            leases.acquire(url, "subset", opts)
        assert proxy.faults == 1 and proxy.log[0][0] == "PUT"

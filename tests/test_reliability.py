"""What clusters do to runs, provoked for real on the tiny teacher (docs/reliability.md):

preemption   a SIGTERM to a training subprocess: the step in flight is checkpointed, the run exits
             143 with one line; the same command resumes it bit-identically to an uninterrupted
             run. Two jax.distributed CPU processes, SIGTERM to one: both stop at the same step.
             SIGINT: the same guard (in-process), a second SIGINT ends the process at once.
non-finite   NaN losses and gradients injected into the jitted step (config.train.nan_at_steps):
             skipped and counted, nothing applied; past config.train.max_skipped_steps one line
             naming the step, the newest checkpoint finite; with a larger limit the run resumes.
damage       newest checkpoints cut with `truncate` or missing files: resume falls back to the
             newest intact one with a warning each; none intact: one line, nothing overwritten.
workdir      a second run on a busy workdir exits at once naming the first; a SIGKILLed run's
             lock is taken over.
"""

import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import restore as restore_cli
from lard_jax import compile_cache, hf, preemption, safetensors_io, trainer, workdir_lock
from lard_jax.model import LlamaForCausalLM
from tests.conftest import cpu_env
from tests.tiny import save_tiny_teacher, write_word_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = 300  # steps of the runs that a signal interrupts (~5 ms each on CPU): room to land mid-training


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    save_tiny_teacher(d / "teacher", seed=41, max_position_embeddings=16)
    write_word_documents(d / "data", seed=42, count=24)
    return d


@pytest.fixture(autouse=True)
def _no_persistent_cache_after():
    yield
    compile_cache.disable_compilation_cache()  # in-process runs point JAX's cache at their workdir


def _flags(assets, workdir, *extra):
    return [
        f"--config={ROOT}/configs/base.py",
        f"--config.workdir={workdir}",
        f"--config.model.checkpoint={assets / 'teacher'}",
        f"--config.data.source={assets / 'data'}",
        "--config.model.dtype=float32",
        "--config.model.param_dtype=float32",
        "--config.data.seq_len=16",
        "--config.train.batch_size=4",
        "--config.train.grad_accum=2",
        "--config.train.lora_rank=4",  # LoRA dropout on: the resumed run must also restore the RNG
        "--config.train.lr=0.003",
        "--config.loss.kernel_impl=xla",
        "--config.mesh.num_devices=1",
        "--config.mesh.data=1",
        *extra,
    ]


ENV = cpu_env()  # one CPU device per process


def _cli(assets, workdir, *extra, timeout=300):
    args = [sys.executable, "-m", "experiments.restore", *_flags(assets, workdir, *extra)]
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _start(assets, workdir, *extra, log):
    args = [sys.executable, "-m", "experiments.restore", *_flags(assets, workdir, *extra)]
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, procs, timeout=240.0):
    """Until <workdir>/metrics_stage1.jsonl logs `step` (the run is past compilation, training)."""
    path, t0 = os.path.join(workdir, "metrics_stage1.jsonl"), time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= step:
            return
        for p in procs:
            assert p.poll() is None, f"the run ended (status {p.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def _wait_for_path(path, procs, timeout=60.0):
    t0 = time.time()
    while not os.path.exists(path):
        for p in procs:
            assert p.poll() is None, f"the run ended (status {p.returncode}) before {path} appeared"
        assert time.time() - t0 < timeout, f"no {path} within {timeout} s"
        time.sleep(0.01)


def _signal_mid_training(proc, signum):
    """`signum` to a process frozen (SIGSTOP) mid-training, then SIGCONT: it lands during training
    however fast the remaining steps would have run."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)


def _seed_cache(src, dst):
    """Copy a finished run's compiled programs into a new workdir (same programs: no recompilation)."""
    import shutil

    shutil.copytree(os.path.join(src, compile_cache.CACHE_SUBDIR), os.path.join(dst, compile_cache.CACHE_SUBDIR))


def _tensors(workdir):
    path = os.path.join(workdir, "hf_student", "model.safetensors")
    return {k: np.asarray(v) for k, v in safetensors_io.open_tensors(path).items()}


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _steps(workdir, stage="stage1"):
    folder = os.path.join(workdir, "checkpoints", stage)
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """An uninterrupted LONG-step run: the reference result, and compiled programs for the others."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    out = _cli(assets, workdir, f"--config.train.steps={LONG}", "--config.train.checkpoint_every=100")
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


# ---------------------------------------------------------------------------------------------- preemption
@pytest.mark.slow
def test_sigterm_checkpoints_the_step_in_flight_and_resume_is_bit_identical(assets, straight, tmp_path):
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    _seed_cache(straight, workdir)
    flags = (f"--config.train.steps={LONG}", "--config.train.checkpoint_every=100")
    with open(tmp_path / "log", "w") as log:
        proc = _start(assets, workdir, *flags, log=log)
        _wait_for_step(workdir, 3, [proc])
        _signal_mid_training(proc, signal.SIGTERM)
        proc.wait(timeout=120)
    text = open(tmp_path / "log").read()
    assert proc.returncode == 143, text[-3000:]  # 128 + SIGTERM: "preempted, rerun me"
    assert "Traceback" not in text
    (line,) = _error_lines(text)
    assert line.startswith("error: stage1: stopped by SIGTERM after step ") and "rerun the same command" in line
    stopped = int(line.split("after step ")[1].split()[0])
    assert 3 <= stopped < LONG
    assert _steps(workdir)[-1] == stopped  # the step in flight, checkpointed
    logged = [json.loads(r)["step"] for r in open(workdir / "metrics_stage1.jsonl")]
    assert logged[-1] == stopped
    assert not os.path.exists(workdir / "hf_student") and not os.path.exists(workdir / "run.lock")

    resumed = _cli(assets, workdir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped} " in resumed.stdout
    a, b = _tensors(straight), _tensors(workdir)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit-identical to the uninterrupted run
    # a finished run: checkpoints deleted (config.train.keep_checkpoints_after=False), outputs listed
    assert not os.path.exists(workdir / "checkpoints")
    assert f"restored student  {workdir / 'hf_student'}" in resumed.stdout
    assert "training checkpoints deleted" in resumed.stdout


def test_sigint_is_noted_and_a_second_one_ends_the_process():
    previous = signal.getsignal(signal.SIGINT)
    with preemption.PreemptionGuard() as guard:
        assert not guard.reached(1)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread before the next line
        assert guard.signal_name == "SIGINT" and guard.reached(2)
        error = guard.stopped("stage1", 2, 10, "/ckpt")
    assert signal.getsignal(signal.SIGINT) is previous  # restored
    assert error.exit_code == 130 and "stopped by SIGINT after step 2 of 10" in str(error)
    # the second SIGINT ends the process at once, by the signal (no traceback, no cleanup)
    code = (
        "import os, signal, time\n"
        "from lard_jax.preemption import PreemptionGuard\n"
        "with PreemptionGuard() as g:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert g.signal_name == 'SIGINT'\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('survived')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGINT and "survived" not in out.stdout, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


_DRIVER = (  # one process of a jax.distributed run on this machine: then the command line, unchanged
    "import sys, jax\n"
    "port, index = sys.argv.pop(1), int(sys.argv.pop(1))\n"
    "jax.distributed.initialize(f'localhost:{port}', 2, index)\n"
    "from experiments import restore\n"
    "sys.exit(restore.main(sys.argv))\n"
)


def _two_processes(assets, workdir, logs, *extra):
    port = str(_free_port())
    flags = _flags(assets, workdir, *extra)
    flags = [f for f in flags if not f.startswith("--config.mesh.")]  # data = -1: both processes' devices
    return [
        subprocess.Popen(
            [sys.executable, "-c", _DRIVER, port, str(i), *flags, "--config.distributed=True"],
            cwd=ROOT,
            env=ENV,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _run_two(assets, workdir, paths, flags, *, timeout, interrupt=False):
    """Both processes to the end (after SIGTERM to process 1 at step 3 when `interrupt`); their
    logs' texts. Killed if still running when it fails."""
    logs = [open(p, "w") for p in paths]
    procs = _two_processes(assets, workdir, logs, *flags)
    try:
        if interrupt:
            _wait_for_step(workdir, 3, procs)
            _signal_mid_training(procs[1], signal.SIGTERM)
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    return procs, [p.read_text() for p in paths]


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step(assets, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync manager (the coordination service) makes
    both processes checkpoint the same step and stop; rerunning both resumes there."""
    workdir = tmp_path / "run"
    flags = ("--config.train.steps=40", "--config.train.checkpoint_every=100")  # SIGSTOP: no race to win
    paths = [tmp_path / f"log{i}" for i in range(2)]
    procs, texts = _run_two(assets, workdir, paths, flags, timeout=120, interrupt=True)
    assert [p.returncode for p in procs] == [143, 143], [t[-2000:] for t in texts]
    lines = [_error_lines(t) for t in texts]
    assert all(len(x) == 1 for x in lines), texts
    stopped = {int(x[0].split("after step ")[1].split()[0]) for x in lines}
    assert len(stopped) == 1, lines  # the same step on both processes
    (stopped,) = stopped
    assert "agreed by all 2 processes" in lines[0][0]
    assert _steps(workdir)[-1] == stopped

    procs, texts = _run_two(assets, workdir, paths, flags, timeout=240)
    assert [p.returncode for p in procs] == [0, 0], [t[-2000:] for t in texts]
    assert all(f"resumed from step {stopped} " in t for t in texts)
    assert all(np.isfinite(v).all() for v in _tensors(workdir).values())


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_update_is_skipped_in_the_jitted_step_with_grad_accumulation(assets, monkeypatch):
    """One NaN micro-batch of two: the whole update is skipped, parameters and optimizer state
    bitwise unchanged, the step counted; the next finite step applies."""
    teacher, params = hf.load_pretrained(str(assets / "teacher"))
    student = LlamaForCausalLM(teacher.config.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    original = trainer.make_loss_fn

    def poisoned(*args):
        loss_fn = original(*args)

        def wrapped(trainable, frozen, batch, rng):
            batch = dict(batch)
            poison = batch.pop("poison")
            loss, metrics = loss_fn(trainable, frozen, batch, rng)
            return loss * jnp.where(poison, jnp.nan, 1.0), metrics

        return wrapped

    monkeypatch.setattr(trainer, "make_loss_fn", poisoned)
    lora = trainer.LoraSpec(rank=0, dropout=0.0)
    mask = trainer.trainable_mask(params)
    trainable = trainer.init_trainable(params, mask, lora, jax.random.PRNGKey(0))
    opt, sched = trainer.make_optimizer(lr=3e-3, warmup_steps=1, total_steps=4)
    state = trainer.TrainState(
        jnp.zeros((), jnp.int32), trainable, opt.init(trainable), jax.random.PRNGKey(0), jnp.zeros((), jnp.int32)
    )
    step = jax.jit(trainer.make_train_step(teacher, student, trainer.LossSpec(kernel_impl="xla"), lora, opt, sched))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 2, 16), 3, 259)  # [accum, micro, T]
    batch = {"input_ids": ids, "mask": jnp.ones(ids.shape, bool)}
    state, _ = step(state, params, dict(batch, poison=jnp.array([False, False])))  # one finite step first
    before = jax.device_get(state)
    after, m = step(state, params, dict(batch, poison=jnp.array([False, True])))
    after = jax.device_get(after)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    assert int(after.step) == 2 and int(after.skipped) == 1
    for a, b in zip(jax.tree_util.tree_leaves((before.trainable, before.opt_state)),
                    jax.tree_util.tree_leaves((after.trainable, after.opt_state))):  # fmt: skip
        assert np.array_equal(a, b)
    again, m = step(jax.device_put(after), params, dict(batch, poison=jnp.array([False, False])))
    assert float(m["skipped"]) == 0.0 and int(again.skipped) == 1
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(after.trainable), jax.tree_util.tree_leaves(again.trainable))
    )


def _restore_raw(workdir, step):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", "stage1", str(step), "default"))


def test_nonfinite_steps_past_the_limit_stop_the_run_and_a_larger_limit_resumes(assets, tmp_path, capsys):
    workdir = tmp_path / "run"
    flags = _flags(
        assets,
        workdir,
        "--config.train.steps=6",
        "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=10",
        "--config.train.nan_at_steps=(2,3,4)",
        "--config.train.max_skipped_steps=2",
    )
    rc = restore_cli.main(["restore", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    (line,) = _error_lines(err)
    assert line.startswith("error: stage1 step 4: non-finite loss nan") and "max_skipped_steps=2" in line, line
    assert "newest checkpoint (step 3)" in line
    assert [w for w in err.splitlines() if w.startswith("warning: stage1 step ")] == [
        f"warning: stage1 step {s}: non-finite loss nan, gradient norm nan; update skipped, parameters unchanged "
        f"({n} of at most config.train.max_skipped_steps=2)"
        for s, n in ((2, 1), (3, 2))
    ]
    assert _steps(workdir) == [1, 2, 3] and not os.path.exists(workdir / "hf_student")
    one, three = _restore_raw(workdir, 1), _restore_raw(workdir, 3)
    assert int(three["skipped"]) == 2
    for a, b in zip(jax.tree_util.tree_leaves(one["trainable"]), jax.tree_util.tree_leaves(three["trainable"])):
        assert np.isfinite(b).all() and np.array_equal(a, b)  # steps 2 and 3 applied nothing

    # a larger limit: the same command resumes from step 3, skips step 4 too, and finishes
    rc = restore_cli.main(["restore", *flags, "--config.train.max_skipped_steps=5"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "resumed from step 3 " in out.out and "stage1 step 4: non-finite" in out.err
    records = {json.loads(r)["step"]: json.loads(r) for r in open(workdir / "metrics_stage1.jsonl")}
    assert [records[s]["skipped"] for s in range(1, 7)] == [0, 1, 1, 1, 0, 0]
    assert records[6]["skipped_total"] == 3
    assert all(np.isfinite(v).all() for v in _tensors(workdir).values())


# ---------------------------------------------------------------------------------------------- damage
def _tree_digest(folder):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# orbax's reads of a damaged step leave tensorstore callbacks for an event loop already closed
# ("Event loop is closed", ignored by Python): noise of the failed read, not of this code
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoints_fall_back_and_none_intact_changes_nothing(assets, tmp_path, capsys):
    workdir = tmp_path / "run"
    flags = _flags(
        assets,
        workdir,
        "--config.train.steps=4",
        "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=4",
        "--config.train.keep_checkpoints_after=True",
    )
    assert restore_cli.main(["restore", *flags]) == 0
    capsys.readouterr()
    reference = _tensors(workdir)
    ckpts = workdir / "checkpoints" / "stage1"
    assert _steps(workdir) == [1, 2, 3, 4]
    # step 4: a data file cut short; step 3: a file missing
    for data in glob.glob(str(ckpts / "4" / "default" / "**" / "d" / "*"), recursive=True):
        subprocess.run(["truncate", "-s", "7", data], check=True)
    os.remove(ckpts / "3" / "default" / "_METADATA")

    assert restore_cli.main(["restore", *flags]) == 0
    out = capsys.readouterr()
    warnings = [w for w in out.err.splitlines() if w.startswith("warning: ")]
    assert any("checkpoint step 4 of stage1 does not read back" in w and "resuming from step 2" in w for w in warnings)
    assert any("checkpoint step 3 of stage1 does not read back" in w for w in warnings), warnings
    assert "resumed from step 2 " in out.out
    assert sorted(os.listdir(workdir / "checkpoints" / "damaged" / "stage1")) == ["3", "4"]  # kept, aside
    for k, v in _tensors(workdir).items():
        assert np.array_equal(reference[k], v), k  # steps 3 and 4 again: the same result

    # every checkpoint damaged: one line, nothing on disk changed
    for step in _steps(workdir):
        subprocess.run(["truncate", "-s", "0", str(ckpts / str(step) / "default" / "_METADATA")], check=True)
    before = _tree_digest(workdir / "checkpoints"), _tree_digest(workdir / "hf_student")
    assert restore_cli.main(["restore", *flags]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "no checkpoint of stage1 reads back (step 4: " in line and "nothing was changed" in line, line
    assert "Traceback" not in err
    assert (_tree_digest(workdir / "checkpoints"), _tree_digest(workdir / "hf_student")) == before


# ---------------------------------------------------------------------------------------------- workdir
@pytest.mark.slow
def test_second_run_on_a_busy_workdir_exits_at_once_and_a_killed_runs_lock_is_taken_over(assets, straight, tmp_path):
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    _seed_cache(straight, workdir)
    flags = (f"--config.train.steps={LONG}", "--config.train.checkpoint_every=100")
    with open(tmp_path / "log", "w") as log:
        first = _start(assets, workdir, *flags, log=log)
        try:
            _wait_for_step(workdir, 2, [first])
            _wait_for_path(workdir / "checkpoints" / "stage1" / "1", [first])  # step 1's (async) checkpoint, done
            first.send_signal(signal.SIGSTOP)  # frozen mid-training: alive, holding the workdir
            t0 = time.time()
            second = _cli(assets, workdir, *flags)
            elapsed = time.time() - t0
        finally:
            first.kill()  # SIGKILL: no cleanup, the lock file stays behind
            first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = _error_lines(second.stderr)
    assert f"in use by another run (pid {first.pid} on host {socket.gethostname()}" in line, line
    assert "teacher:" not in second.stdout and elapsed < 60  # before any weight was read
    assert json.load(open(workdir / "run.lock"))["pid"] == first.pid  # stale now
    assert 1 in _steps(workdir)  # a fresh run always checkpoints step 1
    newest = _steps(workdir)[-1]

    third = _cli(assets, workdir, *flags)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of a run that is no longer running (pid {first.pid} " in third.stderr
    assert f"resumed from step {newest} " in third.stdout
    assert not os.path.exists(workdir / "run.lock")


def test_workdir_lock_rules(tmp_path, monkeypatch):
    """The lock's decisions without a training run: busy while held (this process, another open
    file); a dead holder's record is taken over; without flock, pid liveness on this host and the
    heartbeat's age for another host decide."""
    held = workdir_lock.WorkdirLock(str(tmp_path))
    assert held.acquire() is None
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()} on host"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    held.release()
    assert not os.path.exists(tmp_path / "run.lock")

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier", "command": "restore"}
    (tmp_path / "run.lock").write_text(json.dumps(record))
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    assert lock.acquire()["pid"] == record["pid"]  # flock free: the holder is gone
    lock.release()

    monkeypatch.setattr(workdir_lock.WorkdirLock, "_flock", staticmethod(lambda fd: None))  # a file system without
    (tmp_path / "run.lock").write_text(json.dumps(dict(record, pid=os.getppid())))  # alive, this host
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getppid()}"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    (tmp_path / "run.lock").write_text(json.dumps(record))  # dead, this host
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    assert lock.acquire()["pid"] == record["pid"]
    lock.release()
    other = dict(record, host="elsewhere", pid=1)
    (tmp_path / "run.lock").write_text(json.dumps(other))  # another host, fresh heartbeat
    with pytest.raises(workdir_lock.WorkdirBusy, match="on host elsewhere"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - workdir_lock.STALE_AFTER_S - 1
    os.utime(tmp_path / "run.lock", (old, old))  # another host, heartbeat stopped
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    assert lock.acquire()["host"] == "elsewhere"
    lock.release()

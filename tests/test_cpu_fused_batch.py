"""cpu-fused's batch path: a batch of 2+ images streamed through the stages (whole rounds image-parallel on
1-thread lanes, the rest one by one through the batch-1 program), against each image run alone.

Every library this CPU runs is built (avx2, avx512, and avx512amx, the bf16 one, where the CPU has AMX and the OS
grants the tile state); each comparison is bit for bit (``assert_array_equal``), from NaN-poisoned arenas and
outputs, so an image that is skipped, written twice into another's slot or read from the wrong place fails.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import kernel_library, random_gmbinet

from edgekit.errors import EdgekitError
from edgekit.kernels.cpu import runtime as cpu_fused
from edgekit.kernels.fold import fold_gmbinet
from edgekit.models.gmbinet import GMBINetConfig

# widths 24 / 32: lanes of 6 and 8 per stage, so the avx512amx library takes its owned-lanes cut at batch 1 on
# 2 threads (the tail's program) while the 1-thread lanes take the plain cut: the two must agree bit for bit
SMALL = GMBINetConfig(widths=(8, 16, 24, 32, 40), depths=(1, 2, 1, 1), out_channels=2)
ISAS = [isa for isa in cpu_fused.ISA_LEVELS]


@pytest.fixture(scope="module", params=ISAS)
def library(request, tmp_path_factory) -> Path:
    isa = request.param
    out = kernel_library(isa, tmp_path_factory)
    probe = cpu_fused.CpuKernels(out, 1)
    amx_refused = isa == "avx512amx" and not probe.amx_active
    probe.close()
    if amx_refused:
        pytest.skip("the OS did not grant this process the AMX tile state: avx512amx would run fp32")
    return out


def fused(library: Path, threads: int, batch_path: str = "stream", seed: int = 7):
    net = fold_gmbinet(random_gmbinet(SMALL, seed=seed), channel_multiple=1)
    blob, offsets = net.param_layout()
    return cpu_fused.FusedNet(cpu_fused.CpuKernels(library, threads), net, blob, offsets, batch_path=batch_path)


def images(n: int, h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_streamed_batch_is_each_image_alone_bit_for_bit(library, threads):
    """Batches of 2, 3 and 8 (full rounds and tails at every thread count, odd sizes): each image's output is
    the bits of that image run alone, and of the whole-batch program's; the lanes exist only once a batch came."""
    net = fused(library, threads)
    whole = fused(library, threads, batch_path="whole")
    x = images(8)
    alone = np.concatenate([net.forward(x[i:i + 1], poison=True) for i in range(8)])
    assert not net._lanes and net._lane_threads is None  # a batch-1 station never makes the lanes
    assert not np.isnan(alone).any()
    for n in (2, 3, 8):
        got = net.forward(x[:n], poison=True)
        assert got.shape == (n, 2, 37, 53)
        np.testing.assert_array_equal(got, alone[:n])
        np.testing.assert_array_equal(whole.forward(x[:n], poison=True), alone[:n])
    # the image-parallel lanes ran (a round of `threads` images fits in 3 and 8 at every thread count here)
    assert bool(net._lanes) == (threads > 1)
    assert (2, 37, 53) not in net._states and (8, 37, 53) not in net._states  # no whole-batch arena streamed


def test_serial_path_and_a_repeated_batch(library):
    net = fused(library, 2, batch_path="serial")
    x = images(3, 20, 24, seed=4)
    a = net.forward(x, poison=True)
    assert not net._lanes  # serial: every image through the 2-thread batch-1 program
    np.testing.assert_array_equal(a, np.concatenate([net.forward(x[i:i + 1]) for i in range(3)]))
    np.testing.assert_array_equal(fused(library, 2).forward(x), a)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_1x1_streamed_batch_is_each_image_alone(library, threads):
    """The INT8 GMBI 1x1 (--precision int8's arithmetic, calibrated here on random images) streams the same way."""
    from edgekit.kernels.cpu.build import gmbi_1x1_ranges, quantize_gmbi_1x1

    model = random_gmbinet(SMALL, seed=3)
    net = fold_gmbinet(model, channel_multiple=1)
    quantize_gmbi_1x1(net, gmbi_1x1_ranges(model, [images(2, 32, 32, seed=8)]))
    blob, offsets = net.param_layout()
    fn = cpu_fused.FusedNet(cpu_fused.CpuKernels(library, threads), net, blob, offsets)
    x = images(5, 33, 41, seed=10)
    alone = np.concatenate([fn.forward(x[i:i + 1], poison=True) for i in range(5)])
    assert all(op.u.gmbi.pw_q for op, ly in zip(*fn.state(1, 33, 41)[2:]) if ly[0].startswith("gmbi"))
    np.testing.assert_array_equal(fn.forward(x, poison=True), alone)
    assert not np.isnan(alone).any()


def test_two_python_threads_on_one_network(library):
    """One network used from two Python threads at once (the forward lock serialises the calls): each thread's
    batches come back with its own images' results, whatever the other thread runs in between."""
    net = fused(library, 2)
    xa, xb = images(5, 29, 31, seed=1), images(2, 29, 31, seed=2)
    ref_a = np.concatenate([net.forward(xa[i:i + 1]) for i in range(5)])
    ref_b = np.concatenate([net.forward(xb[i:i + 1]) for i in range(2)])
    errors = []

    def work(x, ref):
        try:
            for _ in range(6):
                np.testing.assert_array_equal(net.forward(x), ref)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=work, args=a) for a in ((xa, ref_a), (xb, ref_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in ts)


def test_close_frees_the_lanes_and_refuses_later_calls(library):
    net = fused(library, 2)
    net.forward(images(4, 16, 16))
    lanes = net._lanes[(16, 16)]
    assert len(lanes) == 2 and all(k._pool for k, _, _ in lanes)
    # lane 0 works in the batch-1 program's arena (they never run at once), lane 1 in its own
    single = net.state(1, 16, 16)[1]
    assert lanes[0][1][1] is single and not np.shares_memory(lanes[1][1][1], single)
    net.close()
    assert all(k._pool is None for k, _, _ in lanes) and net._lane_threads is None
    assert not net._lanes and not net._states
    with pytest.raises(EdgekitError, match="closed"):
        net.forward(images(2, 16, 16))
    net.kernels.close()


def test_a_failing_lane_leaves_every_program_pointing_into_its_own_arena(library, monkeypatch):
    """A run that fails in one lane raises (after the other lanes are done), and afterwards every program the
    batch used points back into its own arena, never at the caller's freed arrays; the next batch is right."""
    net = fused(library, 2)
    x = images(5, 24, 20, seed=6)
    ref = net.forward(x)
    lanes = net._lanes[(24, 20)]
    programs = [(state, io) for _, state, io in lanes] + [(net.state(1, 24, 20), net._io[(1, 24, 20)])]

    def inside():
        for (plan, acts, ops, _), io in programs:
            lo, hi = acts.ctypes.data, acts.ctypes.data + acts.nbytes
            for slots in io.values():
                assert slots and all(lo <= dict(cpu_fused.pointer_fields(ops[k].args))[path] < hi
                                     for k, path in slots)
        return True

    assert inside()
    # lane 1 fails on its first image; lane 0 waits for that before its own first image, else on a busy machine
    # it could take all 4 images of the round before lane 1's thread even woke, and nothing would fail
    lane1_failed, lane0_run = threading.Event(), lanes[0][0].run

    def fail(*a, **k):
        lane1_failed.set()
        raise EdgekitError("lane boom")

    def after_lane1(*a, **k):
        lane1_failed.wait(30)
        return lane0_run(*a, **k)

    monkeypatch.setattr(lanes[1][0], "run", fail)
    monkeypatch.setattr(lanes[0][0], "run", after_lane1)
    with pytest.raises(EdgekitError, match="lane boom"):
        net.forward(x)
    assert inside()
    monkeypatch.undo()
    np.testing.assert_array_equal(net.forward(x), ref)


def test_unknown_batch_path_is_refused(library):
    with pytest.raises(EdgekitError, match="batch_path 'fast' is not one of stream, serial, whole"):
        fused(library, 1, batch_path="fast")


# ----------------------------------------------------------------------------------------------
# through the runner (an artifact of a tiny checkpoint)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_ckpt):
    if shutil.which("g++") is None or not cpu_fused.supported_isas():
        pytest.skip("cpu-fused needs g++ and an AVX2+FMA or AVX-512 CPU")
    from edgekit.pipeline.compile import compile_model

    out = tmp_path_factory.mktemp("cpu_fused_batch_art") / "A"
    compile_model(str(tiny_ckpt), "cpu-fused", "fp32", str(out), parity_data="synthetic:2", log=lambda *_: None)
    return out


def test_runner_streams_a_batch_refuses_a_nan_image_and_closes(artifact):
    from edgekit import runtime

    x = images(8, 64, 64, seed=9)
    with runtime.load(artifact, threads=2) as runner:
        alone = np.concatenate([runner.infer(x[i:i + 1]) for i in range(8)])
        np.testing.assert_array_equal(runner.infer(x), alone)
        assert runner.fused._lanes
        bad = x.copy()
        bad[5, 1, 10, 10] = np.nan  # one image of the batch
        with pytest.raises(EdgekitError, match="non-finite"):
            runner.infer(bad)
        fused = runner.fused
    assert fused._closed and fused._lane_threads is None and runner.closed
    with runtime.load(artifact, threads=2, batch_path="whole") as whole:
        np.testing.assert_array_equal(whole.infer(x), alone)
        assert not whole.fused._lanes
    with pytest.raises(EdgekitError, match="batch_path"):
        runtime.load(artifact, threads=1, batch_path="sideways")


# ----------------------------------------------------------------------------------------------
# the lanes' threads: a fork, the interpreter's exit, a KeyboardInterrupt


def test_a_forked_child_streams_a_batch(library):
    """A process forked after the lanes ran (a server or the station may fork) streams its own batches: the
    child has none of the parent's threads, and a batch used to wait forever on a lane thread that was not there."""
    import os
    import signal
    import time

    net = fused(library, 2)
    x = images(4, 24, 20, seed=11)
    ref = net.forward(x)
    assert net._lane_threads is not None
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 = right bits, 3 = wrong bits, 4 = an exception
        try:
            code = 0 if np.array_equal(net.forward(x), ref) and np.array_equal(net.forward(x[:3]), ref[:3]) else 3
        except BaseException:  # noqa: BLE001 - told to the parent by the exit code
            code = 4
        os._exit(code)
    deadline, status = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's streamed batch did not finish in 60 s")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    np.testing.assert_array_equal(net.forward(x), ref)  # the parent's lanes still work
    net.close()


def test_a_batch_while_the_interpreter_exits(library, tmp_path):
    """A non-daemon thread that still runs batches after the main thread returned (the interpreter is exiting,
    concurrent.futures refuses new work then) gets its results, and the process exits by itself."""
    import subprocess
    import sys

    script = tmp_path / "exiting.py"
    script.write_text(f"""
import sys, threading, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from test_cpu_fused_batch import fused, images
from pathlib import Path
net = fused(Path({str(library)!r}), 2)
x = images(4, 24, 20, seed=12)
ref = np.concatenate([net.forward(x[i:i + 1]) for i in range(4)])
net.forward(x)  # the lanes and their threads exist

def late():
    time.sleep(0.3)  # the main thread has returned: the interpreter is shutting down
    for _ in range(3):
        assert np.array_equal(net.forward(x), ref)
    print("late batches ok", flush=True)

threading.Thread(target=late).start()
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "late batches ok" and "Traceback" not in proc.stderr, proc.stderr


def test_a_keyboard_interrupt_returns_only_after_every_lane_is_done(library, monkeypatch):
    """Ctrl-C inside a lane (the caller's lane 0), then again while the caller waits for the other lanes: forward
    raises KeyboardInterrupt only once no lane runs any more.  A lane left running wrote on after forward had
    returned, and the next call's lanes could share its arena with it."""
    import signal
    import sys
    import time

    net = fused(library, 2)
    x = images(16, 24, 20, seed=13)
    ref = net.forward(x)
    lanes = net._lanes[(24, 20)]
    main, first_interrupt, second_sent = threading.get_ident(), threading.Event(), threading.Event()
    lane0_run, lane1_run = lanes[0][0].run, lanes[1][0].run

    def lane0(*a, **k):  # the first Ctrl-C lands in the caller's own lane
        if not first_interrupt.is_set():
            first_interrupt.set()
            raise KeyboardInterrupt
        return lane0_run(*a, **k)

    def lane1(*a, **k):  # the second one while the caller waits; this lane goes on for a while after it
        if first_interrupt.wait(30) and not second_sent.is_set():
            time.sleep(0.05)
            second_sent.set()
            signal.pthread_kill(main, signal.SIGALRM)
            time.sleep(0.3)
        return lane1_run(*a, **k)

    def busy() -> bool:
        frames = sys._current_frames()
        for t in threading.enumerate():
            f = frames.get(t.ident) if t.name.startswith("edgekit-cpu-lane") else None
            while f is not None:
                if f.f_code.co_name == "run_lane":
                    return True
                f = f.f_back
        return False

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(lanes[0][0], "run", lane0)
    monkeypatch.setattr(lanes[1][0], "run", lane1)
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            net.forward(x)
        lanes_still_running = busy()
    finally:
        signal.signal(signal.SIGALRM, old)
    assert second_sent.is_set()
    assert not lanes_still_running
    monkeypatch.undo()
    np.testing.assert_array_equal(net.forward(x), ref)
    net.close()


def test_networks_closed_or_dropped_leave_no_threads(library):
    """Networks loaded, run at batch 4 and closed, or dropped without close, 8 times each: no lane thread (nor
    a kernel pool's worker) stays behind."""
    import gc
    import os
    import time

    def threads_now() -> int:
        return len(os.listdir("/proc/self/task"))

    x = images(4, 16, 16, seed=14)
    gc.collect()
    before = threads_now()
    for k in range(16):
        net = fused(library, 2)
        net.forward(x)
        if k % 2 == 0:
            net.close()
            net.kernels.close()
        del net
        gc.collect()
    deadline = time.monotonic() + 10  # a dropped network's lane threads end on their own, soon after
    while threads_now() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_now() == before


def test_close_from_another_thread_while_batches_run(artifact):
    """close() from one thread while two others run batches of 4: every call either returns the right bits or
    is refused in one EdgekitError line; an AttributeError (the runner's network already None) came through when
    the close landed between infer's closed check and the call.  _infer after close is that moment, exactly."""
    import time

    from edgekit import runtime

    x = images(4, 64, 64, seed=15)
    runner = runtime.load(artifact, threads=2)
    ref = runner.infer(x)
    results = []

    def work():
        for _ in range(40):
            try:
                results.append(np.array_equal(runner.infer(x), ref))
            except EdgekitError as e:
                results.append("closed" in str(e))
            except Exception as e:  # noqa: BLE001 - the defect: reported, not raised in the thread
                results.append(repr(e))

    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(0.05)
    runner.close()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts) and len(results) == 80
    assert all(r is True for r in results), [r for r in results if r is not True][:3]
    with pytest.raises(EdgekitError, match="closed"):
        runner._infer(x)  # infer's check passed just before the close

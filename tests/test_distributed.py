"""torchrun + FSDP2, on CPU with the gloo backend: two processes, each holding half of every model and of every global
batch, compute what one process does (the same losses and weights to 1e-5), and a run interrupted under two
processes resumes under one. Two processes are started the way torchrun starts them (RANK / WORLD_SIZE /
MASTER_ADDR in the environment) by torch.multiprocessing, on the tiny teachers of conftest.py."""
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

import ar_teacher
import dmd
import model as M
from test_ar_teacher import shrink_toy_preset, tiny_run

AR = dict(phase="ar", ar_steps=2, batch_size=4, ckpt_every=1)
DMD = dict(init="ar_teacher", num_steps=2, gen_updates=2, critic_ratio=2, batch_size=4, ema_start=1, eval_every=1000,
           eval_clips=4, ckpt_every=1000)


class Interrupted(Exception):
    pass


def skip_evaluations(mp_):
    """The closing and periodic evaluations sample many clips and take no part in these facts: stubbed out."""
    shrink_toy_preset(mp_)
    mp_.setattr(ar_teacher, "report", lambda *a: ({}, torch.zeros(1, 6, 3, 16, 16)))
    mp_.setattr(dmd, "toy_few_step_samples", lambda model, n, *a, **k: (torch.zeros(n, 6, 3, 16, 16), ["red circle"] * n,
                                                                      None))
    mp_.setattr(dmd, "toy_exposure_report", lambda *a, **k: dict(next_off=0.0, own_off=0.0, gap=0.0,
                                                                    own_off_rigid=0.0, own_rigid=1.0, area=[0.0] * 6))


def _process(rank, world, port, root):
    """One of the two processes: stage 1 (uninterrupted, and interrupted after its step-1 checkpoint), then DMD."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp_:
        skip_evaluations(mp_)
        ar_teacher.train(tiny_run(f"{root}/two", **AR))
        calls = []

        def ema_then_stop(*a):  # step 2 runs its forward, backward and update, then the "crash"
            calls.append(1)
            if len(calls) == 2:
                raise Interrupted
            M.ema_update(*a)
        mp_.setattr(ar_teacher, "ema_update", ema_then_stop)
        try:
            ar_teacher.train(tiny_run(f"{root}/crash", **AR))
        except Interrupted:
            pass
        mp_.undo()
        skip_evaluations(mp_)
        dmd.train(dmd.Config(**DMD, out_dir=f"{root}/two"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b, what, tol=1e-5):
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max().item() if torch.is_tensor(a[k]) else abs(a[k] - b[k])
        assert err <= tol, f"{what} {k}: differs by {err:.2e}"


def test_two_processes_compute_what_one_does_and_resume_under_one(_trained_tiny_teachers, tmp_path, monkeypatch):
    for d in ("one", "two", "crash"):
        os.makedirs(tmp_path / d)
        for name in ("base.pt", "ar_teacher.pt"):
            shutil.copy(_trained_tiny_teachers / name, tmp_path / d / name)
    os.remove(tmp_path / "two" / "ar_teacher.pt")  # stage 1 makes it here; DMD then starts from that one
    os.remove(tmp_path / "crash" / "ar_teacher.pt")
    mp.spawn(_process, args=(2, free_port(), str(tmp_path)), nprocs=2)

    skip_evaluations(monkeypatch)
    os.remove(tmp_path / "one" / "ar_teacher.pt")
    ar_teacher.train(tiny_run(tmp_path / "one", **AR))  # one process, the same global batches
    one, two = (M.load_checkpoint(str(tmp_path / d / "ar_teacher.pt")) for d in ("one", "two"))
    assert len(one["history"]) == 2 and one["history"] != [0.0, 0.0]
    close(dict(enumerate(one["history"])), dict(enumerate(two["history"])), "stage-1 loss")
    close(one["model"], two["model"], "stage-1 weights")
    close(one["ema"], two["ema"], "stage-1 EMA")
    close(one["optimizer"]["state"][0], two["optimizer"]["state"][0], "stage-1 Adam state of the first weight")

    partial = M.load_checkpoint(str(tmp_path / "crash" / "ar_teacher.partial.pt"))  # written by 2, step 1 of 2
    assert partial["step"] == 1 and not os.path.exists(tmp_path / "crash" / "ar_teacher.pt")
    ar_teacher.train(tiny_run(tmp_path / "crash", **AR, resume=True))  # ... and resumed by 1
    resumed = M.load_checkpoint(str(tmp_path / "crash" / "ar_teacher.pt"))
    close(one["model"], resumed["model"], "stage-1 weights, 2 processes then 1")

    dmd.train(dmd.Config(**DMD, out_dir=str(tmp_path / "one")))
    one, two = (M.load_checkpoint(str(tmp_path / d / "dmd_ar_teacher_2step.pt")) for d in ("one", "two"))
    for a, b in zip(one["log"][1:], two["log"][1:]):
        close({k: a[k] for k in ("loss_g", "g", "loss_critic")}, b, "DMD log")
    close(one["model"], two["model"], "DMD generator")
    close(one["critic"], two["critic"], "DMD critic")
    close(one["ema"], two["ema"], "DMD EMA")

"""medspan.engines.checkpoint on a tiny ignite engine: exact resume, settings, non-finite state, full disk, DDP.

The engine trains an ``nn.Linear`` on a MONAI ``Dataset`` whose transform draws from its own
``RandomState`` (``RandGaussianNoised``), shuffled by a MONAI ``DataLoader``; its step also draws from
a medspan ``PatchDropout`` generator held by the engine, torch's global generator (dropout), NumPy's
and Python's. A resumed run reproduces an uninterrupted one only if every one of them is restored.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised
from monai.utils import set_determinism
from torch import nn

from medspan.engines.checkpoint import (
    EpochCheckpoint,
    ResumeError,
    StorageError,
    latest_checkpoint,
    settings_diff,
)
from medspan.engines.handlers import ExportWeights
from medspan.errors import TrainingError
from medspan.ssl.teacher import PatchDropout

FP = {"hparams": {"lr": 0.1, "epochs": 4, "model": {"depth": 2}}}


class Kill(RuntimeError):
    """Stands for a kill of the process inside an epoch."""


def _run(
    ckpt_dir: Path,
    epochs: int,
    *,
    kill_at: int | None = None,
    fingerprint: dict | None = None,
    random_state: bool = True,
    n_saved: int = 2,
    on_iteration: Any = None,
    seen: list[int] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, EpochCheckpoint, Engine]:
    """A fresh 'process': seeded as a bundle does, objects built, checkpoint attached, run."""
    set_determinism(seed=0)
    model = nn.Linear(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = [{"x": np.full(8, float(i), np.float32)} for i in range(8)]
    loader = DataLoader(Dataset(data, Compose([RandGaussianNoised("x", prob=1.0, std=0.5)])), batch_size=2,
                        shuffle=True)
    noise = PatchDropout(0.5, seed=1)

    def step(engine: Engine, batch: dict) -> float:
        x = batch["x"].float()
        keep = ~noise(x.shape[0], (2, 4)).reshape(x.shape[0], 8)
        x = nn.functional.dropout(x * keep, 0.25) + random.random() + float(np.random.rand())
        loss = (model(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    engine = Engine(step)
    engine.noise = noise  # a trainer's generator holder, as SmartTrainer.noise
    handler = EpochCheckpoint(ckpt_dir, {"model": model, "optimizer": opt}, n_saved=n_saved,
                              fingerprint=fingerprint if fingerprint is not None else _fp(epochs),
                              random_state=random_state)
    handler.attach(engine)
    if kill_at is not None:
        engine.add_event_handler(Events.ITERATION_STARTED,
                                 lambda e: (_ for _ in ()).throw(Kill("killed")) if e.state.epoch == kill_at else None)
    if on_iteration is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, on_iteration, model)
    if seen is not None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    engine.run(loader, max_epochs=epochs)
    return model, opt, handler, engine


def _fp(epochs: int, **hp: Any) -> dict:
    return {"hparams": {**FP["hparams"], "epochs": epochs, **hp}}


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- exact resume
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    full, full_opt, _, _ = _run(tmp_path / "a", 4)

    with pytest.raises(Kill):
        _run(tmp_path / "b", 4, kill_at=3)  # killed inside epoch 3: checkpoints of epochs 1, 2
    assert _names(tmp_path / "b") == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "fingerprint.json"]
    seen: list[int] = []
    resumed, resumed_opt, handler, engine = _run(tmp_path / "b", 4, seen=seen)
    assert handler.resumed_from == tmp_path / "b" / "checkpoint_epoch=2.pt"
    assert seen == [3, 4] and engine.state.iteration == 4 * 4
    assert _same(full, resumed), "a resumed run must end with the weights of the uninterrupted run"
    sa, sb = full_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in ("exp_avg", "exp_avg_sq"))
    # n_saved=2 counts the files of the interrupted run too
    assert _names(tmp_path / "b") == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt", "fingerprint.json"]
    state = torch.load(tmp_path / "b" / "checkpoint_epoch=4.pt", weights_only=True)
    assert {"model", "optimizer", "trainer", "settings", "random_state", "checkpointer"} <= set(state)
    assert state["random_state"]["world_size"] == 1 and len(state["random_state"]["ranks"]) == 1
    gens = state["random_state"]["ranks"][0]["generators"]
    assert "engine.noise.generator" in gens  # the trainer's noise generator
    assert any(k.startswith("loader.dataset.transform") and k.endswith(".R") for k in gens)  # MONAI transforms

    # the same resume without the random state (re-seeded, as before) does not reproduce the run
    with pytest.raises(Kill):
        _run(tmp_path / "c", 4, kill_at=3)
    reseeded, *_ = _run(tmp_path / "c", 4, random_state=False)
    assert not _same(full, reseeded)


def test_mid_epoch_kill_reruns_the_epoch_identically(tmp_path: Path) -> None:
    """Killed after 2 of the 4 iterations of epoch 2: the re-run repeats all of epoch 2, same result."""
    full, *_ = _run(tmp_path / "a", 2)

    def _kill_mid(engine: Engine, model: nn.Module) -> None:
        if engine.state.iteration == 6:
            raise Kill("killed mid-epoch")

    with pytest.raises(Kill):
        _run(tmp_path / "b", 2, on_iteration=_kill_mid)
    seen: list[int] = []
    resumed, *_ = _run(tmp_path / "b", 2, seen=seen)
    assert seen == [2] and _same(full, resumed)


# ----------------------------------------------------------------------------- settings
def test_settings_diff_names_dotted_keys() -> None:
    old = {"hparams": {"lr": 0.1, "model": {"depth": 2}, "gone": 1}, "datalist": "a.json"}
    new = {"hparams": {"lr": 0.2, "model": {"depth": 3}, "new": [1, 2]}, "datalist": "a.json"}
    assert settings_diff(old, new) == [
        ("hparams.gone", 1, "(absent)"),
        ("hparams.lr", 0.1, 0.2),
        ("hparams.model.depth", 2, 3),
        ("hparams.new", "(absent)", [1, 2]),
    ]


def test_resume_with_other_settings_names_each_key_and_loads_nothing(tmp_path: Path) -> None:
    _run(tmp_path, 2, fingerprint=_fp(2))
    before = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    with pytest.raises(ResumeError) as info:
        _run(tmp_path, 2, fingerprint={"hparams": {**_fp(2)["hparams"], "lr": 0.2, "model": {"depth": 3}}})
    msg = str(info.value)
    assert str(tmp_path) in msg and "other settings (2 differ" in msg
    assert "hparams.lr: 0.1 -> 0.2" in msg and "hparams.model.depth: 2 -> 3" in msg
    assert "epochs" not in msg
    after = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "fingerprint.json"]


def test_more_epochs_continue_a_finished_run_and_fewer_are_refused(tmp_path: Path) -> None:
    _run(tmp_path, 2, fingerprint=_fp(2))
    seen: list[int] = []
    _, _, handler, engine = _run(tmp_path, 3, fingerprint=_fp(3), seen=seen)  # raise epochs: continue
    assert handler.resumed_from is not None and handler.resumed_from.name == "checkpoint_epoch=2.pt"
    assert seen == [3] and engine.state.epoch == 3
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "fingerprint.json"]
    assert json.loads((tmp_path / "fingerprint.json").read_text())["hparams"]["epochs"] == 3
    with pytest.raises(ResumeError, match=r"checkpoint is at epoch 3 but epochs is 2"):
        _run(tmp_path, 2, fingerprint=_fp(2))


def test_resume_off_starts_afresh(tmp_path: Path) -> None:
    _run(tmp_path, 2)
    (tmp_path / "tmpabcd1234").write_bytes(b"half a checkpoint")  # left by a kill during a write
    seen: list[int] = []
    model = nn.Linear(1, 1)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    EpochCheckpoint(tmp_path, {"model": model}, resume=False).attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert seen == [1] and _names(tmp_path) == ["checkpoint_epoch=1.pt"]


# ----------------------------------------------------------------------------- non-finite state
def _poison_at(iteration: int):
    def _poison(engine: Engine, model: nn.Module) -> None:
        if engine.state.iteration == iteration:
            with torch.no_grad():
                model.bias.fill_(float("nan"))

    return _poison


def test_non_finite_checkpoint_is_refused_and_the_last_good_one_kept(tmp_path: Path) -> None:
    """n_saved=1: ignite would delete the epoch-1 file before writing epoch 2; it must survive."""
    with pytest.raises(TrainingError) as info:
        _run(tmp_path, 3, n_saved=1, on_iteration=_poison_at(6))  # inside epoch 2 (4 iterations / epoch)
    msg = str(info.value)
    assert "checkpoint_epoch=2.pt" in msg and "model.bias" in msg and "not saved" in msg
    assert f"newest complete checkpoint is {tmp_path / 'checkpoint_epoch=1.pt'}" in msg
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt", "fingerprint.json"]
    state = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=1.pt"


def test_non_finite_weights_are_not_exported(tmp_path: Path) -> None:
    good, bad = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    ExportWeights(tmp_path, {"model.pt": good})()
    before = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(TrainingError, match=r"student\.pt \(exported weights\): not saved: 1 of 2 tensors.*weight"):
        ExportWeights(tmp_path, {"model.pt": good, "student.pt": bad})()
    assert (tmp_path / "model.pt").read_bytes() == before  # nothing written, not even the finite one
    assert _names(tmp_path) == ["model.pt"]


def test_resume_refuses_a_non_finite_checkpoint_of_an_older_version(tmp_path: Path) -> None:
    _run(tmp_path, 1)
    path = tmp_path / "checkpoint_epoch=1.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["bias"].fill_(float("nan"))
    torch.save(state, path)
    with pytest.raises(TrainingError, match=r"checkpoint_epoch=1\.pt \(checkpoint\): not resumed: 1 of .*model\.bias"):
        _run(tmp_path, 2, fingerprint=_fp(1))


# ----------------------------------------------------------------------------- full disk
@contextmanager
def _tmpfs(where: Path) -> Iterator[Path | None]:
    """A 1 MiB tmpfs at ``where`` when this process may mount one (root with CAP_SYS_ADMIN), else None."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=False, capture_output=True)
    if res.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def _fill(folder: Path, leave: int = 8192) -> None:
    """Fill the file system of ``folder`` until ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _assert_full_disk_handled(ckpt: Path, err: StorageError) -> None:
    msg = str(err)
    assert err.errno == errno.ENOSPC
    assert "no space left on device" in msg and str(ckpt / "checkpoint_epoch=2.pt") in msg
    assert f"newest complete checkpoint is {ckpt / 'checkpoint_epoch=1.pt'}" in msg
    # no partial file, the previous checkpoint intact and loadable
    assert sorted(n for n in _names(ckpt) if n != "filler") == ["checkpoint_epoch=1.pt", "fingerprint.json"]
    state = torch.load(ckpt / "checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4  # epoch 1 of 4 iterations


def test_full_disk_on_a_real_tmpfs(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small") as ckpt:
        if ckpt is None:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); see the injected test")
        fill_once = _fill_at_epoch(ckpt, 2)
        with pytest.raises(StorageError) as info:
            _run(ckpt, 3, on_iteration=fill_once)
        _assert_full_disk_handled(ckpt, info.value)

        # exported weights on the full disk: the same message, no file, no temporary
        with pytest.raises(StorageError, match="no space left on device") as info:
            ExportWeights(ckpt, {"model.pt": nn.Linear(64, 64)})()
        assert str(ckpt / "model.pt") in str(info.value)
        assert not (ckpt / "model.pt").exists() and not any(n.startswith(".tmp") for n in _names(ckpt))


def _fill_at_epoch(folder: Path, epoch: int):
    done: list[bool] = []

    def _fill_once(engine: Engine, model: nn.Module) -> None:
        if engine.state.epoch == epoch and not done:
            _fill(folder)
            done.append(True)

    return _fill_once


def test_full_disk_injected_at_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same behaviour where no small file system can be mounted (CI runners are not root):
    torch.save writes part of the file, then the write fails with ENOSPC as the kernel reports it."""
    real_save = torch.save
    calls: list[int] = []

    def save_then_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_full)
    with pytest.raises(StorageError) as info:
        _run(tmp_path, 3)
    _assert_full_disk_handled(tmp_path, info.value)

    with pytest.raises(StorageError, match="no space left on device") as info:
        ExportWeights(tmp_path / "export", {"model.pt": nn.Linear(2, 2)})()
    assert str(tmp_path / "export" / "model.pt") in str(info.value)
    assert _names(tmp_path / "export") == []


# ----------------------------------------------------------------------------- DDP: one random state per rank
def _ddp_phase(rank: int, ckpt: str, phase: str) -> dict[int, list[float]]:
    """One 'process run' of a rank: seeded as a bundle does, per-rank noise generator, 2 epochs of 2 steps."""
    set_determinism(seed=0)
    noise = PatchDropout(0.5, seed=10 + rank)  # seeded per rank, as multi_gpu.json does
    draws: dict[int, list[float]] = {}

    def step(engine: Engine, batch: Any) -> None:
        draws.setdefault(engine.state.epoch, []).extend(
            [float(torch.rand(())), float(np.random.rand()), random.random(),
             float(noise(1, (2, 2)).float().flatten() @ torch.arange(4.0))]
        )

    engine = Engine(step)
    engine.noise = noise
    EpochCheckpoint(ckpt, {}, fingerprint={"hparams": {"epochs": 2}}).attach(engine)
    if rank == 0:  # rank 0 validates: it draws more between epochs than the others
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: torch.rand(5))
    if phase == "killed":
        engine.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: (_ for _ in ()).throw(Kill("killed")))
    try:
        engine.run([0, 1], max_epochs=2)
    except Kill:
        pass
    return draws


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for phase, d in (("full", "a"), ("killed", "b"), ("resumed", "b")):
            out[phase] = _ddp_phase(rank, f"{tmp}/{d}", phase)
            torch.distributed.barrier()  # a new run starts when rank 0 has written its checkpoint
        torch.save(out, f"{tmp}/draws_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_every_rank_resumes_its_own_random_state(tmp_path: Path) -> None:
    """2 gloo processes (forked: no re-import), each with its own random streams; the resumed epoch 2
    of every rank repeats that rank's uninterrupted epoch 2 (before: every rank got rank 0's states)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    draws = [torch.load(tmp_path / f"draws_{r}.pt") for r in (0, 1)]
    for r in (0, 1):
        assert list(draws[r]["resumed"]) == [2], "the resumed run starts at epoch 2"
        assert draws[r]["resumed"][2] == draws[r]["full"][2], f"rank {r} did not continue its own random streams"
    assert draws[0]["full"][2] != draws[1]["full"][2]
    state = torch.load(tmp_path / "b" / "checkpoint_epoch=1.pt", weights_only=True)
    assert state["random_state"]["world_size"] == 2 and len(state["random_state"]["ranks"]) == 2

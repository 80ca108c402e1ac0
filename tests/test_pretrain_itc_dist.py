"""ITC over the global batch: 2 gloo processes with B each == 1 process with 2B (loss and gradients), with
padding repeats and with identical texts across ranks."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.losses import itc_loss, same_text

B, DIN, E = 3, 6, 5


def make_model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"img": torch.nn.Linear(DIN, E), "txt": torch.nn.Linear(DIN, E)})


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, DIN, generator=g), torch.randn(2 * B, DIN, generator=g)


# padding repeats (not real pairs): rank 0 has 2 real pairs, rank 1 only 1 -> uneven counts per rank
VALID = torch.tensor([True, True, False, True, False, False])
# token ids: text 0 (rank 0) and text 4 (rank 1) are the same caption, so neither is the other's negative
IDS = torch.tensor([[101, 5, 102], [101, 6, 102], [101, 7, 102], [101, 8, 102], [101, 5, 102], [101, 9, 102]])
CASES = ((None, None), (VALID, None), (None, IDS), (VALID, IDS))


def step(model, temp, x_img, x_txt, valid=None, ids=None):
    model.zero_grad()
    temp.grad = None
    img = F.normalize(model["img"](x_img), dim=-1)
    txt = F.normalize(model["txt"](x_txt), dim=-1)
    loss = itc_loss(img, txt, temp, valid, None if ids is None else same_text(ids))[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, temp.grad.clone()


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, temp = make_model(), torch.nn.Parameter(torch.full([1], 0.07))
    x_img, x_txt = make_data()
    sl = slice(rank * B, (rank + 1) * B)
    results = []
    for valid, ids in CASES:
        loss, grads, tgrad = step(model, temp, x_img[sl], x_txt[sl], None if valid is None else valid[sl],
                                  None if ids is None else ids[sl])
        # what data-parallel training does: average loss (for logging) and gradients over ranks
        dist.all_reduce(loss)
        for g in list(grads.values()) + [tgrad]:
            dist.all_reduce(g)
        results.append({"loss": loss / 2, "grads": {k: v / 2 for k, v in grads.items()}, "temp": tgrad / 2})
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_itc_is_world_size_independent(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    results = torch.load(out)
    model, temp = make_model(), torch.nn.Parameter(torch.full([1], 0.07))
    assert len(results) == len(CASES)
    for got, (valid, ids) in zip(results, CASES):
        ref_loss, ref_grads, ref_tgrad = step(model, temp, *make_data(), valid, ids)
        assert torch.allclose(got["loss"], ref_loss, atol=1e-5), valid
        for k, g in ref_grads.items():
            assert torch.allclose(got["grads"][k], g, atol=1e-5), (k, valid)
        assert torch.allclose(got["temp"], ref_tgrad, atol=1e-5), valid
        assert ref_grads["img.weight"].abs().sum() > 0

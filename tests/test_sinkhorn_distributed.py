"""sela.sinkhorn.assign across processes: 2 gloo ranks on the CPU, each holding its own rows.

One launch of two fresh interpreters (``spawn``) solves every case below; each rank returns its labels and
scaling, and the test compares the concatenation with the single-process solve of all rows. The ranks
meet through a FileStore in ``tmp_path`` (no port to race for), every collective has a 20 s timeout, and
the parent joins with a deadline and kills stragglers, so a mismatched collective fails the test instead
of hanging the suite.

Exactness. A rank computes the same per-row quantities as one process, but sums the column marginal in
a different order (per rank, then all-reduced), so the iterates differ by float rounding. The cases are
therefore solved to a tight ``tol`` and compared with a relative tolerance on the scaling; the labels
must then be identical (no sample is that close to a tie on these generic problems).
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import pytest
import torch

from sela.sinkhorn import assign

WORLD = 2
JOIN_S = 90.0  # no worker may outlive this (the whole launch takes about 10 s)
TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases() -> dict[str, dict]:
    """name -> {logits (N, K), split (rows of rank 0, rank 1), kwargs of assign}."""
    g = torch.Generator().manual_seed(0)
    cases: dict[str, dict] = {}
    x = torch.randn(1000, 20, generator=g) * 3
    cases["even"] = {"logits": x, "split": (500, 500), "kwargs": {}}
    cases["uneven"] = {"logits": x, "split": (870, 130), "kwargs": {}}
    # rank 1 holds fewer rows than there are clusters: only the global N >= K matters
    cases["tiny_rank"] = {"logits": x[:600], "split": (593, 7), "kwargs": {}}
    # a rank with no rows at all (more ranks than shards) still takes part in every collective
    cases["empty_rank"] = {"logits": x[:300], "split": (300, 0), "kwargs": {}}
    # non-uniform prior and a warm start from a neighbouring problem (the next epoch's logits)
    prior = torch.linspace(1, 3, 20, dtype=torch.float64)
    prior /= prior.sum()
    warm = assign(x + 0.05 * torch.randn(x.shape, generator=g), prior=prior).scaling
    cases["prior_warm"] = {"logits": x, "split": (400, 600), "kwargs": {"prior": prior, "init": warm}}
    # a cluster every sample puts 10 logits below its best: exp(-250) underflows float32 -> the scaling
    # is absorbed into the kernel (stabilised float32 path), on both ranks at the same pass
    y = torch.randn(300, 6, generator=g)
    y[:, 0] = y.amax(dim=1) - 10.0 - torch.rand(300, generator=g)
    cases["underflow"] = {"logits": y, "split": (120, 180), "kwargs": {}}
    cases["underflow_empty_rank"] = {"logits": y, "split": (0, 300), "kwargs": {}}
    # that column underflows within rank 1's rows only: both ranks must still take the same path
    z = torch.randn(300, 6, generator=g)
    z[150:, 0] = z[150:].amax(dim=1) - 10.0
    cases["underflow_one_rank"] = {"logits": z, "split": (150, 150), "kwargs": {}}
    # N == K: the argmax leaves clusters empty; the repair fills them from the global rows alike
    # (at the default tol: N == K is a near-permutation, which float32 cannot resolve to 1e-6)
    w = torch.randn(100, 100, generator=torch.Generator().manual_seed(1)) * 3
    cases["n_equals_k"] = {"logits": w, "split": (60, 40), "kwargs": {"tol": 1e-3}}
    for case in cases.values():
        case["kwargs"] = {"tol": TOL, "max_iter": 5000, **case["kwargs"]}
    return cases


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=20),
        )
        for name, case in _cases().items():
            n0 = case["split"][0]
            rows = case["logits"][:n0] if rank == 0 else case["logits"][n0:]
            res = assign(rows.clone(), **case["kwargs"])
            result[name] = {
                "labels": res.labels,
                "scaling": res.scaling,
                "n_iter": res.n_iter,
                "error": res.error,
                "log_domain": res.log_domain,
                "n_absorb": res.n_absorb,
                "n_repaired": res.n_repaired,
                "imbalance": res.imbalance,
            }
        # distributed=None picks the global solve; distributed=False must solve the local rows alone
        x = _cases()["uneven"]["logits"]
        local = x[:870] if rank == 0 else x[870:]
        result["local_only"] = {"labels": assign(local, distributed=False, tol=TOL).labels}
        torch.distributed.destroy_process_group()
    except Exception:  # reported to the parent, which fails the test with the traceback
        result = {"traceback": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sinkhorn_dist")
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "store"), str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    end = time.monotonic() + JOIN_S
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} did not finish within {JOIN_S} s (a collective hung?)"
    out = []
    for r, p in enumerate(procs):
        path = tmp / f"rank{r}.pt"
        assert p.exitcode == 0 and path.exists(), f"rank {r} exited with {p.exitcode} and no result"
        res = torch.load(path)
        assert "traceback" not in res, f"rank {r} failed:\n{res['traceback']}"
        out.append(res)
    return out


@pytest.mark.parametrize("name", list(_cases()))
def test_ranks_equal_single_process(rank_results, name):
    case = _cases()[name]
    single = assign(case["logits"], **case["kwargs"])
    r0, r1 = (res[name] for res in rank_results)
    assert len(r0["labels"]) == case["split"][0] and len(r1["labels"]) == case["split"][1]
    # both ranks followed the same iterates, so they agree exactly on everything global
    assert torch.equal(r0["scaling"], r1["scaling"])
    assert r0["n_iter"] == r1["n_iter"] and r0["error"] == r1["error"]
    assert r0["log_domain"] == r1["log_domain"] == single.log_domain
    assert r0["n_absorb"] == r1["n_absorb"] and r0["imbalance"] == r1["imbalance"] == single.imbalance
    assert r0["n_repaired"] == r1["n_repaired"] == single.n_repaired
    assert r0["error"] <= case["kwargs"]["tol"] and single.error <= case["kwargs"]["tol"]
    # two solutions within TOL of the marginals: log b moves ~ TOL / (share of soft rows), here < 1e-3
    if case["kwargs"]["tol"] == TOL:  # at a looser tol the rounding moves the stopping point further
        torch.testing.assert_close(r0["scaling"], single.scaling, rtol=1e-3, atol=1e-12)
    assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), single.labels)


def test_underflow_absorbed_globally(rank_results):
    # a column that underflows float32 on every rank is absorbed into the kernel (same pass on all ranks,
    # checked above), without the float64 log domain
    for res in rank_results:
        for name in ("underflow", "underflow_empty_rank"):
            assert res[name]["n_absorb"] >= 1 and res[name]["log_domain"] is False


def test_n_equals_k_repaired_globally(rank_results):
    labels = torch.cat([res["n_equals_k"]["labels"] for res in rank_results])
    assert torch.equal(torch.bincount(labels, minlength=100), torch.ones(100, dtype=torch.long))
    assert rank_results[0]["n_equals_k"]["n_repaired"] >= 1


def test_distributed_false_solves_local_rows(rank_results):
    x = _cases()["uneven"]["logits"]
    for rank, rows in enumerate((x[:870], x[870:])):
        assert torch.equal(rank_results[rank]["local_only"]["labels"], assign(rows, tol=TOL).labels)

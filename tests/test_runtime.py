"""Torch threads are chosen against the jobs already running on the machine."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepclust import runtime


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_busy_machine_gets_one_thread_and_a_warning(monkeypatch, caplog, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 2.0, 1.0))  # two other jobs on 2 cores
    torch.set_num_threads(2)
    with caplog.at_level("WARNING"):
        assert runtime.choose_threads(None) == 1
    assert torch.get_num_threads() == 1
    assert "other jobs keep 2.4 of 2 cores busy: using 1 torch thread(s) instead of 2" in caplog.text


def test_idle_machine_keeps_torchs_threads(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    torch.set_num_threads(2)
    assert runtime.choose_threads(None) == 2


def test_requested_threads_and_the_users_omp_setting_win(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert runtime.choose_threads(2) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.choose_threads(None) == 2  # the user said how many: not second-guessed
    with pytest.raises(ValueError, match="threads must be at least 1"):
        runtime.choose_threads(0)


def test_bf16_autocast_is_used_where_the_device_runs_it_natively(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    assert runtime.native_bf16(torch.device("cuda"))
    assert runtime.autocast_dtype(torch.device("cuda"), True) is torch.bfloat16
    assert runtime.autocast_dtype(torch.device("cuda"), False) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: emulated bf16
    assert not runtime.native_bf16(torch.device("cuda"))
    with caplog.at_level("WARNING"):
        assert runtime.autocast_dtype(torch.device("cuda"), True) is None
    assert "compute capability 7.0) has no native bf16: training in float32" in caplog.text
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not runtime.native_bf16(torch.device("cpu"))  # emulated bf16 is slower than fp32: stay in fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.native_bf16(torch.device("cpu"))


class FlagAtOps(TorchDispatchMode):
    """Records, at each matrix product and convolution, the CUDA flags in force (they are global: a CPU run sees
    the value a GPU run's kernels would be chosen under)."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.products: list[bool] = []  # allow_tf32 at each product
        self.convolutions: list[tuple[int, bool]] = []  # (rows, cudnn.benchmark) at each convolution

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            self.products.append(torch.backends.cuda.matmul.allow_tf32)
        if name == "convolution":
            self.convolutions.append((args[0].shape[0], torch.backends.cudnn.benchmark))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_and_autotuner_on():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = True  # as configure_device sets them
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_clustering_evaluation_and_bank_products_run_without_tf32_and_the_network_keeps_it(tf32_and_autotuner_on):
    from deepclust.cluster import kmeans, pca_whiten
    from deepclust.cluster.graph import exact_knn_graph
    from deepclust.eval.knn import knn_predict
    from deepclust.memory import MemoryBank

    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    labels = torch.arange(300) % 3
    bank = MemoryBank(300, 16, 0.5)
    for name, fn in {"kmeans": lambda: kmeans(x, 4, iters=3), "kNN": lambda: knn_predict(x[:50], x, labels, 3, k=10),
                     "bank logits": lambda: bank.logits(x[:8], 0.1), "PCA": lambda: pca_whiten(x, 8),
                     "kNN graph": lambda: exact_knn_graph(x, 5)}.items():
        with FlagAtOps() as seen:
            fn()
        assert seen.products and not any(seen.products), f"{name}: a product ran with TF32 allowed"
        assert torch.backends.cuda.matmul.allow_tf32, f"{name} left TF32 off for the network"
    with FlagAtOps() as seen:
        torch.nn.Linear(16, 4)(x)  # the network's own products
    assert seen.products and all(seen.products)


def test_pca_makes_no_float64_copy_of_all_the_features():
    from deepclust.cluster import pca_whiten

    class Float64Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.largest = max(self.largest, t.numel())
            return out

    x = torch.randn(1000, 12, generator=torch.Generator().manual_seed(1)) * 3 + 5
    with Float64Sizes() as sizes:
        z = pca_whiten(x, 6, chunk=100)
    assert sizes.largest <= 100 * 12  # a chunk at a time, never 1000 x 12
    cov = torch.cov(z.double().t())
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)


def test_pcp_warm_up_epochs_reuse_one_compiled_loss():
    """compile=true: t moves every warm-up epoch; read as a device scalar it is no guard, so the loss compiles once
    (a Python float in the loss made one graph an epoch)."""
    from deepclust.backbones import Backbone
    from deepclust.methods import METHODS
    from deepclust.methods.base import Batch

    compiles = []

    def counting_backend(graph, inputs):
        compiles.append(graph)
        return graph.forward

    torch._dynamo.reset()
    method = METHODS["pcp"](Backbone("convnet", 16, width=8), 64, METHODS["pcp"].Config(min_clusters=4))
    compiled = torch.compile(method, backend=counting_backend)
    gen = torch.Generator().manual_seed(2)
    views, index = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)], torch.arange(8)
    losses = []
    for t in (0.2, 0.3, 0.4):  # three warm-up epochs
        method.t = t
        losses.append(compiled(Batch(views, index))[0])
        method.t = t  # and the eager loss, for the value
        torch.testing.assert_close(losses[-1], method.loss(Batch(views, index))[0])
    assert len(compiles) == 1 and len({float(v) for v in losses}) == 3
    torch._dynamo.reset()


def test_pads_second_view_of_varying_rows_runs_without_cudnn_autotuning(tf32_and_autotuner_on):
    from deepclust.backbones import Backbone
    from deepclust.methods import METHODS
    from deepclust.methods.base import Batch

    method = METHODS["pad"](Backbone("convnet", 16, width=8), 64)
    gen = torch.Generator().manual_seed(3)
    index = torch.arange(8)
    isolated = torch.tensor([1, 4, 6])  # no SCS yet: every sample is isolated, three of them in this view
    batch = Batch([torch.randn(8, 3, 16, 16, generator=gen), torch.randn(3, 3, 16, 16, generator=gen)], index,
                  view_rows=[None, isolated])
    with FlagAtOps() as seen:
        method.loss(batch)
    assert {rows: bench for rows, bench in seen.convolutions} == {8: True, 3: False}
    assert torch.backends.cudnn.benchmark  # restored

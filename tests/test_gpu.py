"""On a machine with real NVIDIA GPUs: the real inventory, isolation and CUDA results.

Every test here is marked ``gpu`` and skips cleanly where NVML finds no GPU.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic._client import GatewayClient
from gpu_magic.server.inventory import read_nvml

from .conftest import Gateway, start_gateway, wait_for

REAL = read_nvml()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not REAL, reason="needs a real NVIDIA GPU (NVML found none)")]


# Its runners stay warm briefly: a warm runner holds the GPU (a CUDA context), and another
# gateway on the machine (the shared one below) waits for it as for any process outside it.
KEEP_WARM_S = "10"


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("real"), "--keep-warm", KEEP_WARM_S,
                       simulate=None)
    yield gw
    gw.stop()


def test_real_inventory_is_served(real_gateway: Gateway) -> None:
    pool = real_gateway.client().pool()
    assert not pool["simulated"]
    uuids = {g["uuid"] for n in pool["nodes"] for g in n["gpus"]}
    assert uuids == {g.uuid for g in REAL}


def test_cell_sees_only_its_granted_gpu(real_gateway: Gateway) -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}
    client = real_gateway.client()
    seen = gpu_magic.run("import os\nos.environ['CUDA_VISIBLE_DEVICES'], os.environ['GPU_MAGIC_GRANT']",
                         "any", ns, client=client)
    visible, grant = seen[0], json.loads(seen[1])
    assert grant["simulated"] is False and grant["count"] == 1
    assert visible.split(",") == [REAL[grant["indices"][0]].uuid]


def test_torch_cell_runs_on_cuda_and_tensors_come_back_on_cpu(
    real_gateway: Gateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    ns: dict[str, Any] = {"__name__": "__main__"}
    client = real_gateway.client()
    gpu_magic.run("import torch\nassert torch.cuda.is_available()\n"
                  "t = torch.ones(1000, device='cuda') * 2\nname = torch.cuda.get_device_name(0)",
                  "any", ns, client=client)
    assert ns["t"].device.type == "cpu" and float(ns["t"].sum()) == 2000.0
    assert "came back on the CPU" in capsys.readouterr().err


def test_a_model_trained_on_cuda_comes_back_with_its_parameters(real_gateway: Gateway) -> None:
    torch = pytest.importorskip("torch")
    ns: dict[str, Any] = {"__name__": "__main__"}
    gpu_magic.run(
        "import torch\nnet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))"
        "\nnet[1].weight = net[0].weight  # tied\nnet = net.cuda()\n"
        "net[0].weight.tag = 'shared'\n"
        "net(torch.ones(2, 4, device='cuda')).sum().backward()\n"
        "x = torch.ones(3, device='cuda', requires_grad=True)\nloss = (x * 2).sum()",
        "any", ns, client=real_gateway.client(), quiet=True)
    net = ns["net"]
    params = list(net.parameters())
    assert params and all(type(p) is torch.nn.Parameter and p.is_leaf and p.requires_grad
                           and p.device.type == "cpu" for p in params)
    assert net[1].weight is net[0].weight and net[0].weight.tag == "shared"
    assert ns["x"].is_leaf and ns["x"].requires_grad
    assert float(ns["loss"].detach()) == 6.0 and ns["loss"].requires_grad


def test_a_cell_run_again_on_a_warm_runner_has_its_gpu_memory_again(
        real_gateway: Gateway) -> None:
    # A warm runner used to keep a cell's tensors until the next cell (for good, once a
    # function of the cell referred to them): the second run of a cell that takes 60% of
    # the GPU ran out of memory where a fresh runner would not.
    pytest.importorskip("torch")
    client = real_gateway.client()
    cell = ("import os, torch\n_, total = torch.cuda.mem_get_info()\n"
            "big = torch.empty(int(total * 0.6), dtype=torch.uint8, device='cuda')\n"
            "def keep():\n    return big\npid = os.getpid()")
    pids = []
    for _ in range(3):
        ns: dict[str, Any] = {"__name__": "__main__"}
        gpu_magic.run(cell, "any", ns, client=client, quiet=True, return_names=["pid"])
        pids.append(ns["pid"])
    assert len(set(pids)) == 1  # all three on one warm runner


@pytest.mark.skipif(len(REAL) != 1, reason="on a box of several GPUs the cell takes another one")
def test_a_cell_waits_for_a_cuda_process_outside_gpu_magic_then_runs(
        real_gateway: Gateway) -> None:
    pytest.importorskip("torch")
    import subprocess
    import sys

    outside = subprocess.Popen(
        [sys.executable, "-c", "import time, torch\nx = torch.ones(1, device='cuda')\n"
         "print('holding', flush=True)\ntime.sleep(8)"], stdout=subprocess.PIPE, text=True)
    try:
        assert outside.stdout is not None and outside.stdout.readline().strip() == "holding"
        import pynvml

        def listed() -> bool:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            return outside.pid in {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}

        try:
            wait_for(listed, 5)
        except AssertionError:
            # (in a container NVML may give the host's pids: such a process on a GPU the
            # gateway holds is taken for one of its own runners)
            pytest.skip("NVML does not list the process under the pid this host sees")
        client = real_gateway.client()
        assert wait_for(lambda: client.pool()["nodes"][0]["gpus"][0]["foreign"], 10)
        ns: dict[str, Any] = {"__name__": "__main__"}
        gpu_magic.run("import os\npid = os.getpid()", "any", ns, client=client, quiet=True,
                      wait=60)
        assert outside.poll() is not None  # it ran once the outside process had ended
    finally:
        outside.kill()
        outside.wait()
        outside.stdout.close()  # type: ignore[union-attr]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_a_shared_gateway_s_sandboxed_cell_uses_its_gpu(tmp_path: Path) -> None:
    # bwrap's own /dev has no GPU device files: a shared gateway's cells found no GPU
    tokens = {u: secrets.token_urlsafe(32) for u in ("alice", "bob")}
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    tokens_file.chmod(0o600)
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), simulate=None)
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            probe = ("import os, subprocess\n"
                     "devices = sorted(d for d in os.listdir('/dev') if d.startswith('nvidia'))\n"
                     "smi = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True)")
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run(probe, "any", ns, client=alice, quiet=True)
            assert "nvidiactl" in ns["devices"], ns["devices"]
            assert ns["smi"].returncode == 0 and "GPU 0" in ns["smi"].stdout, ns["smi"]
            try:
                import torch  # noqa: F401
            except ImportError:
                return
            gpu_magic.run("import torch\nn = torch.cuda.device_count()\n"
                          "t = float((torch.ones(10, device='cuda') * 2).sum())", "any", ns,
                          client=alice, quiet=True)
            assert ns["n"] == 1 and ns["t"] == 20.0
    finally:
        gw.stop()

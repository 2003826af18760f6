"""benchmarks/gpu.py, the GPU check: without a CUDA GPU it says so and exits 0; its throughput part runs on the CPU
(``--device cpu``, shrunk) and prints what it prints on a GPU. Its two-trial sweep is the smoke sweep's, which the
orchestrator tests run."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert gpu.main([]) == 0
    assert capsys.readouterr().out == ("gpu check: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                                       "nothing to check\n")


def test_throughput_part_on_the_cpu(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu.main(["--device", "cpu", "--no-sweep", "--no-compile"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "cifar10 U-Net, 16 channels: 565k parameters" in out
    rows = re.findall(r"^\| cifar10 U-Net, 16 channels \| (float32|bf16 autocast) \| ([\d,.]+) \| (\d+)% \|", out, re.M)
    assert [row[0] for row in rows] == ["float32", "bf16 autocast"]
    assert all(float(ips.replace(",", "")) > 0 and int(mfu) > 0 for _, ips, mfu in rows)
    assert "gpu check done" in out

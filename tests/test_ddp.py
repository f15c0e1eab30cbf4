"""Data-parallel training under torchrun, for real: 2 processes (gloo on the CPU) on 2 DRIVE images.

The test launches this same file under `python -m torch.distributed.run`; run that way (the bottom of
the file) each process runs training.train exactly as `torchrun main.py` would, with one addition: it
records the Trainer that training.train builds, and after training the processes exchange digests of their
weights and the image indices they trained on. Identical weights after steps on different images can
only come from gradients averaged across the processes.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

if __name__ != "__main__":  # under torchrun this file is a script, not a test module
    from conftest import REPO, TINY, run_script


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def digests(state_dict):
    """name -> sha256 of the tensor's bytes: equal digests mean bit-identical tensors."""
    return {name: hashlib.sha256(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, tensor in state_dict.items()}


def test_two_processes_train_one_model(small_drive, tmp_path):
    import networks
    weights, report = tmp_path / "weights", tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, report,
               "--data-root", small_drive, "--weights-dir", weights, "--run-name", "ddp", *TINY]
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = json.loads(report.read_text())
    assert [rank["rank"] for rank in ranks] == [0, 1] and all(rank["world_size"] == 2 for rank in ranks)

    # Each process trained on its own shard: at every step the two saw different images.
    seen = [rank["indices"] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 2  # 2 epochs x ceil(2 images / global batch 2) steps
    for step_0, step_1 in zip(*seen):
        assert sorted(step_0 + step_1) == [0, 1], seen

    # ... and yet both hold bit-identical parameters, every one of which moved away from the shared start.
    # (BatchNorm running statistics are not compared: without SyncBatchNorm, which gloo lacks, DDP copies
    # rank 0's at the start of each forward and each process then updates them from its own images.)
    parameter_names = [name for name, _ in networks.build_model("cenet").named_parameters()]
    for name in parameter_names:
        assert ranks[0]["weights"][name] == ranks[1]["weights"][name], name
        assert ranks[0]["weights"][name] != ranks[0]["initial"][name], name

    # Only rank 0 wrote: one run folder, one "saved" line; its checkpoint holds the trained weights.
    assert sorted(path.name for path in weights.iterdir()) == ["ddp"]
    assert result.stdout.count("saved ") == 1
    checkpoint = weights / "ddp" / "final.pth"
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["world_size"] == 2 and payload["step"] == 2
    assert digests(payload["state_dict"]) == ranks[0]["weights"]

    evaluated = run_script("test.py", "--checkpoint", checkpoint, "--data-root", small_drive,
                           "--out", tmp_path / "results", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "results" / "metrics.json").is_file()


def worker(report, argv):
    """One torchrun process: training.train, then an exchange of what each process ended with."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch.distributed as dist

    import devices
    import framework
    import main
    import training

    trainers = []

    class RecordingTrainer(framework.Trainer):
        """The real Trainer, plus a note of its starting weights and of the indices of every batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial = digests(framework.unwrap(self.model).state_dict())
            trainers.append(self)

        @property
        def indices(self):
            return self.plan["indices"][:self.step_count].tolist()

    framework.Trainer = RecordingTrainer  # training.train looks the class up when it runs
    try:
        training.train(*main.parse_settings(argv))
        trainer = trainers[0]
        mine = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "indices": trainer.indices,
                "initial": trainer.initial, "weights": digests(framework.unwrap(trainer.model).state_dict())}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() == 0:
            Path(report).write_text(json.dumps(everyone))
        devices.close_distributed()
    finally:
        devices.close_distributed(finished=False)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])

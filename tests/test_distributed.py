"""The same job data-parallel under `accelerate launch`: two CPU processes on the gloo backend."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient


def test_two_process_data_parallel_job_makes_one_run_and_one_version(tmp_path, tiny_base):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(tiny_base)},
                "data": {"path": "builtin:zaragoza-faq", "max_examples": 24, "max_length": 256},
                "lora": {"r": 4, "alpha": 8},
                "training": {
                    "output_dir": str(tmp_path / "out"),
                    "max_steps": 2,
                    "batch_size": 2,
                    "eval_steps": 2,
                },
                "tracking": {"tracking_uri": uri, "experiment": "ddp"},
                "registry": {"model_name": "ddp-model"},
            }
        )
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "tuneops",
        "train",
        str(job),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("training on 2 process(es)") == 2
    client = MlflowClient(uri, uri)  # the registry too: an earlier test may have set the global registry URI
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["tuneops.world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name = 'ddp-model'")] == ["1"]

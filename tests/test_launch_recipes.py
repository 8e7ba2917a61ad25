"""tools/launch/launch.py, called as a user would: the gcloud commands of the TPU VM recipe, the
sbatch script of the SLURM recipe (run under stand-in `srun`/`scontrol`/`gcloud`/`sbatch`
scripts, so no cluster, network or cloud SDK is needed), and the refusal of bad input."""
from __future__ import annotations

import configparser
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "tools" / "launch" / "launch.py"
TEMPLATE = ROOT / "tools" / "launch" / "slurm.sbatch"
CONFIG = "configs/vit.py:s16"
NOTE = "--config.logging.note=two words"  # a value with a space must survive the quoting

TPU_BASE = ["tpu-vm", "--name", "zoo-pod", "--zone", "us-central2-b", "--config", CONFIG,
            "--workdir", "gs://bucket/run"]
SLURM_BASE = ["slurm", "--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu",
              "--time", "02:00:00", "--config", CONFIG, "--workdir", "/shared/runs/s16",
              "--job-name", "s16"]


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def command_of(ssh: list[str]) -> list[str]:
    """The remote command of a `gcloud ... ssh ... --command=...`, split as the worker's shell
    would split it."""
    [script] = [a[len("--command="):] for a in ssh if a.startswith("--command=")]
    return shlex.split(script)


def test_tpu_vm_commands_create_setup_and_run_on_every_worker():
    result = launch(*TPU_BASE, "--create", "--accelerator-type", "v4-32", "--version",
                    "tpu-ubuntu2204-base", "--repo", "https://example.com/zoo.git", "--ref",
                    "v0.1.0", "--dry-run", "--", "--config.batch_size=1024", NOTE)
    assert result.returncode == 0, result.stderr
    create, setup, run = [shlex.split(line) for line in result.stdout.splitlines()]

    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "zoo-pod", "--zone",
                      "us-central2-b", "--accelerator-type", "v4-32", "--version",
                      "tpu-ubuntu2204-base"]
    for ssh in (setup, run):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "zoo-pod"]
        assert "--worker=all" in ssh and ssh[ssh.index("--zone") + 1] == "us-central2-b"

    install = command_of(setup)
    assert "https://example.com/zoo.git" in install and "v0.1.0" in install
    assert install[-7:] == ["python3", "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]

    train = command_of(run)
    start = train.index("train.py")
    assert train[start - 2:] == ["ZOO_DISTRIBUTED=1", "python3", "train.py", "--config",
                                 CONFIG, "--workdir", "gs://bucket/run",
                                 "--config.batch_size=1024", NOTE]


def test_tpu_vm_without_setup_is_the_train_command_alone():
    result = launch(*TPU_BASE, "--no-setup", "--remote-dir", "src/my zoo", "--dry-run")
    assert result.returncode == 0, result.stderr
    [run] = [shlex.split(line) for line in result.stdout.splitlines()]
    assert "--worker=all" in run
    train = command_of(run)
    assert train[:3] == ["cd", "src/my zoo", "&&"]
    assert train[3:] == ["ZOO_DISTRIBUTED=1", "python3", "train.py", "--config", CONFIG,
                         "--workdir", "gs://bucket/run"]


def test_setup_cfg_has_the_tpu_extra_the_recipe_installs():
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    assert "jax[tpu]" in extras["options.extras_require"]["tpu"]


def test_tpu_vm_runs_the_commands_with_gcloud(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    fake_tool(bin_dir, "gcloud", f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = launch(*TPU_BASE, "--repo", "https://example.com/zoo.git", env=env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(" ssh zoo-pod " in c and "--worker=all" in c for c in calls)
    assert "pip install" in calls[0] and "train.py" in calls[1]


def test_tpu_vm_without_gcloud_is_a_clear_error(tmp_path):
    result = launch(*TPU_BASE, "--no-setup", env=dict(os.environ, PATH=str(tmp_path)))
    assert result.returncode == 2 and "gcloud is not on PATH" in result.stderr


@pytest.mark.parametrize("args, message", [
        (["tpu-vm", "--name", "p", "--zone", "z", "--config", CONFIG, "--workdir", "/tmp/run",
          "--no-setup"], "--workdir=/tmp/run: a local path; allowed: a gs://"),
        (["tpu-vm", "--name", "p", "--zone", "z", "--config", CONFIG, "--workdir", "s3://b/r",
          "--no-setup"], "--workdir=s3://b/r: not a gs:// bucket path"),
        (TPU_BASE, "--repo is required"),
        (TPU_BASE + ["--no-setup", "--create"], "--create needs --accelerator-type"),
        (["tpu-vm", "--name", "My_Pod", "--zone", "z", "--config", CONFIG, "--workdir",
          "gs://b/r", "--no-setup"], "--name=My_Pod"),
        (TPU_BASE + ["--no-setup", "--", "--workdir=gs://other"], "--workdir=gs://other after"),
        (SLURM_BASE[:3] + ["--gpus-per-node", "0"] + SLURM_BASE[5:], "--gpus-per-node=0"),
        (["slurm", "--nodes", "0"] + SLURM_BASE[3:], "--nodes=0"),
        (SLURM_BASE + ["--layout", "per-core"], "invalid choice: 'per-core'"),
        (SLURM_BASE + ["--workdir", "/tmp/run"], "--workdir=/tmp/run: a node-local directory"),
        (SLURM_BASE + ["--time", "2h"], "--time=2h"),
        (SLURM_BASE + ["--config", "configs/missing.py:s16"], "no config file"),
        (SLURM_BASE + ["--", "--process_id=0"], "--process_id=0 after '--'"),
])
def test_bad_input_is_refused_before_anything_runs(args, message):
    result = launch(*args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert result.stdout == ""


def test_raw_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True, timeout=30)


@pytest.mark.parametrize("layout, tasks_per_node", [("per-gpu", 4), ("per-node", 1)])
def test_slurm_script_for_each_layout(tmp_path, layout, tasks_per_node):
    result = launch(*SLURM_BASE, "--layout", layout, "--cpus-per-task", "8", "--dry-run",
                    "--", "--config.batch_size=512", NOTE)
    assert result.returncode == 0, result.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

    text = result.stdout
    for line in ("#SBATCH --nodes=3", f"#SBATCH --ntasks-per-node={tasks_per_node}",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --job-name=s16",
                 "#SBATCH --cpus-per-task=8"):
        assert line in text.splitlines()
    assert not re.search(r"@[A-Z_]+@", text)  # every placeholder filled in
    assert "srun " in text
    assert (f"python train.py --config {CONFIG} --workdir /shared/runs/s16 "
            f"--config.batch_size=512 {shlex.quote(NOTE)}") in text

    # Run it as sbatch would, with stand-ins for srun and scontrol: the environment every task
    # starts with is what jax.distributed.initialize() reads.
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    fake_tool(bin_dir, "scontrol", 'printf "gpu-a01\\ngpu-a02\\ngpu-a03\\n"\n')
    fake_tool(bin_dir, "srun", f"""{{
  echo "coordinator=$JAX_COORDINATOR_ADDRESS"
  echo "local_devices=${{JAX_LOCAL_DEVICE_IDS-unset}}"
  echo "srun_cpus=$SRUN_CPUS_PER_TASK"
  echo "cwd=$PWD"
  printf "%s\\n" "$@"
}} > {shlex.quote(str(log))}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="12345",
               SLURM_JOB_NODELIST="gpu-a[01-03]")
    subprocess.run(["bash", str(script)], check=True, env=env, timeout=30)
    lines = log.read_text().splitlines()
    assert lines[0] == "coordinator=gpu-a01:61497"  # 12345 % 4096 + 61440, JAX's own port
    assert lines[1] == ("local_devices=0,1,2,3" if layout == "per-node" else "local_devices=unset")
    assert lines[2:4] == ["srun_cpus=8", f"cwd={ROOT}"]
    srun_args = lines[4:]
    assert "--kill-on-bad-exit=1" in srun_args
    assert srun_args[srun_args.index("python"):] == [
            "python", "train.py", "--config", CONFIG, "--workdir", "/shared/runs/s16",
            "--config.batch_size=512", NOTE]


def test_slurm_optional_settings_left_out_and_port_pinned():
    result = launch("slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG,
                    "--workdir", "gs://bucket/run", "--port", "23456", "--dry-run")
    assert result.returncode == 0, result.stderr
    for left_out in ("#SBATCH --partition", "#SBATCH --cpus-per-task", "SRUN_CPUS_PER_TASK="):
        assert left_out not in result.stdout
    assert "COORDINATOR_PORT=23456" in result.stdout.splitlines()
    assert "--workdir gs://bucket/run" in result.stdout


def test_slurm_output_writes_the_script_and_submit_calls_sbatch(tmp_path):
    dry = launch(*SLURM_BASE, "--dry-run").stdout
    out = tmp_path / "job.sbatch"
    result = launch(*SLURM_BASE, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == dry and f"sbatch {out}" in result.stdout

    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    fake_tool(bin_dir, "sbatch", f'cat "$1" > {shlex.quote(str(log))}\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               TMPDIR=str(tmp_path))  # where the submitted script is kept
    result = launch(*SLURM_BASE, env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == dry

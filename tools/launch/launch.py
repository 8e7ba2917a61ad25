#!/usr/bin/env python3
r"""Launch recipes for multi-host training: the same `train.py` command on every host.

  python tools/launch/launch.py tpu-vm --name my-pod --zone us-central2-b \
      --create --accelerator-type v4-32 --version tpu-ubuntu2204-base \
      --repo https://github.com/ORG/attention-zoo.git --ref v0.1.0 \
      --config configs/vit.py:s16 --workdir gs://bucket/run --dry-run -- --config.batch_size=1024
  python tools/launch/launch.py slurm --nodes 4 --gpus-per-node 8 --layout per-gpu \
      --partition gpu --time 24:00:00 --config configs/vit.py:s16 --workdir /shared/runs/s16 \
      --dry-run

Anything after `--` is passed to train.py unchanged. `--dry-run` prints what would run (the
gcloud commands one per line, shell-quoted; or the rendered sbatch script) and runs nothing.

Nothing here tells train.py how many hosts there are: train.py (zoo/training/mesh.py) calls
`jax.distributed.initialize()` with no arguments when it finds a multi-host environment
(SLURM_NTASKS > 1, several TPU_WORKER_HOSTNAMES, or ZOO_DISTRIBUTED=1, which the TPU-VM recipe
sets because gcloud's TPU VMs keep their worker list in the VM metadata), and JAX reads the rest
(coordinator, process count and index) from that environment. The recipes only make sure every
host starts the same command in a cluster environment JAX understands.

Standard library only, so it runs on a login node or a laptop without the package installed.
Bad input is one line on stderr and exit status 2, before anything runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

USAGE_EXIT = 2
HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
SLURM_TEMPLATE = os.path.join(HERE, "slurm.sbatch")

# setup.cfg's `tpu` extra pins jax[tpu] in the tested range (tests/test_launch_recipes.py checks
# that the extra is still there).
TPU_INSTALL_TARGET = ".[tpu]"
# Flags that would give every process the same value where each needs its own (SLURM sets them
# per task), or that the launcher already passes itself.
_OWN_FLAGS = ("--config", "--workdir")
_PER_PROCESS_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
# Directories that exist separately on every node: a multi-node run needs one shared workdir
# (process 0 writes the checkpoints and metrics every process must be able to restore from).
_NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _fail(message: str) -> None:
    print(f"launch.py: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def _bad(flag: str, value, allowed: str) -> UsageError:
    return UsageError(f"{flag}={value}: {allowed}")


# ------------------------------------------------------------------------------------------------
# Checks shared by both recipes.
# ------------------------------------------------------------------------------------------------
def _check_train_args(train_args: list[str], *, forbidden: tuple[str, ...]) -> None:
    """The flags after `--` are train.py's; refuse the few that would break a multi-host run."""
    for arg in train_args:
        name = arg.split("=", 1)[0]
        if name in forbidden:
            where = ("launch.py sets it" if name in _OWN_FLAGS
                     else "every process needs its own value, which the cluster provides")
            raise UsageError(f"{arg} after '--': {where}; allowed: other train.py flags "
                             f"(give --config/--workdir as launch.py options)")


def _check_config(config: str) -> None:
    # A typo should fail here, not once per host after the job waited in the queue. Relative to
    # the repository root, which is where the command runs on every host.
    path = config.split(":", 1)[0]
    if not os.path.isfile(os.path.join(REPO_ROOT, path)):
        raise _bad("--config", config, f"no config file {path!r} in {REPO_ROOT}; allowed: a "
                   "config file relative to the repository root and its variant "
                   "(configs/vit.py:smoke)")


# ------------------------------------------------------------------------------------------------
# Cloud TPU VM pod slice.
# ------------------------------------------------------------------------------------------------
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_GS_PATH = re.compile(r"gs://[^/\s]+(/.*)?")


def _check_gs_workdir(workdir: str) -> None:
    """Every worker of a slice is a separate VM with its own disk: the run directory has to be
    a bucket they all read and write, or each would keep (and restore) its own checkpoints."""
    if not _GS_PATH.fullmatch(workdir):
        what = ("a local path" if "://" not in workdir else "not a gs:// bucket path")
        raise _bad("--workdir", workdir, f"{what}; allowed: a gs:// path every worker of the "
                   "slice can write (gs://bucket/run), as a multi-host run needs one shared "
                   "workdir")


def tpu_vm_commands(args, train_args: list[str]) -> list[list[str]]:
    """The gcloud commands, in order: [create], setup on every worker, train on every worker."""
    if not _TPU_NAME.fullmatch(args.name):
        raise _bad("--name", args.name, "allowed: a TPU name of lowercase letters, digits and "
                   "hyphens, starting with a letter")
    _check_gs_workdir(args.workdir)
    _check_config(args.config)
    _check_train_args(train_args, forbidden=_OWN_FLAGS + _PER_PROCESS_FLAGS)
    if args.create and not (args.accelerator_type and args.version):
        raise UsageError("--create needs --accelerator-type (v4-32, v5litepod-16, ...) and "
                         "--version (the TPU VM runtime, tpu-ubuntu2204-base, ...)")
    if not args.no_setup and not args.repo:
        raise UsageError("--repo is required to set the workers up (git URL of this "
                         "repository); allowed: --repo URL, or --no-setup when every worker "
                         "already has the code in --remote-dir")

    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    commands = []
    if args.create:
        commands.append(tpu + ["create", args.name] + where + [
                "--accelerator-type", args.accelerator_type, "--version", args.version])

    def on_all_workers(script: str) -> list[str]:
        # --worker=all: a pod slice is several VMs, one process each, all running the same
        # command; which worker is which comes from the TPU runtime, not from the command.
        return tpu + ["ssh", args.name] + where + ["--worker=all", f"--command={script}"]

    q = shlex.quote
    remote_dir, python = q(args.remote_dir), q(args.python)
    if not args.no_setup:
        # Clone once, then fetch the ref on every run of the setup so that all workers run the
        # same commit (FETCH_HEAD works for a branch, a tag or a commit id). `&&`: a worker
        # whose step fails stops there, and gcloud reports it.
        commands.append(on_all_workers(" && ".join([
                f"(test -d {remote_dir}/.git || git clone --quiet {q(args.repo)} {remote_dir})",
                f"cd {remote_dir}",
                f"git fetch --quiet origin {q(args.ref)}",
                "git checkout --quiet --detach FETCH_HEAD",
                f"{python} -m pip install --quiet -e {q(TPU_INSTALL_TARGET)}"])))
    train = shlex.join([args.python, "train.py", "--config", args.config,
                        "--workdir", args.workdir] + train_args)
    # ZOO_DISTRIBUTED=1: gcloud-created TPU VMs list their workers in the VM metadata, not in
    # an environment variable train.py could see, so train.py is told to call
    # jax.distributed.initialize(), which reads that metadata.
    commands.append(on_all_workers(f"cd {remote_dir} && ZOO_DISTRIBUTED=1 {train}"))
    return commands


def run_tpu_vm(args, train_args: list[str]) -> None:
    commands = tpu_vm_commands(args, train_args)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return
    if shutil.which("gcloud") is None:
        raise UsageError("gcloud is not on PATH; install the Google Cloud CLI, or use "
                         "--dry-run to print the commands")
    for command in commands:
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)


# ------------------------------------------------------------------------------------------------
# SLURM GPU cluster.
# ------------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_SLURM_WORD = re.compile(r"[A-Za-z0-9_.,-]+")  # job and partition names: no quoting in #SBATCH
_SLURM_TIME = re.compile(r"\d+(-\d+)?(:\d+){0,2}")  # minutes, [D-]HH[:MM[:SS]], MM:SS
LAYOUTS = {
        # One process per GPU: JAX restricts each process to GPU $SLURM_LOCALID by itself.
        "per-gpu": lambda gpus: gpus,
        # One process per node driving all of its GPUs.
        "per-node": lambda gpus: 1,
}
# Ports JAX itself derives from the job id (an ephemeral range, different per job, so two jobs
# sharing a node do not collide); kept unless --port pins one.
_JOB_PORT = "$((SLURM_JOB_ID % 4096 + 61440))"


def _slurm_workdir(workdir: str, nodes: int) -> str:
    if "://" in workdir:
        return workdir  # a bucket
    # The script cds to the repository on every node; a relative path means where the user is.
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if nodes > 1 and any(workdir == d or workdir.startswith(d + "/") for d in _NODE_LOCAL_DIRS):
        raise _bad("--workdir", workdir, f"a node-local directory and --nodes={nodes}; allowed: "
                   "a directory on a filesystem every node mounts, or a gs:// bucket, as a "
                   "multi-host run needs one shared workdir")
    return workdir


def render_slurm(args, train_args: list[str], template: str | None = None) -> str:
    """The sbatch script: the template with its @NAME@ placeholders filled in. A line whose
    value is None (an optional setting not given) is left out, so SLURM's default applies."""
    if args.nodes < 1:
        raise _bad("--nodes", args.nodes, "allowed: 1 or more")
    if args.gpus_per_node < 1:
        raise _bad("--gpus-per-node", args.gpus_per_node, "allowed: 1 or more (this recipe "
                   "is for GPU nodes; use train.py directly on CPUs)")
    if args.layout not in LAYOUTS:  # argparse's choices catch it on the command line
        raise _bad("--layout", args.layout, f"allowed: {', '.join(LAYOUTS)}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise _bad("--cpus-per-task", args.cpus_per_task, "allowed: 1 or more")
    if args.port is not None and not 1024 <= args.port <= 65535:
        raise _bad("--port", args.port, "allowed: 1024..65535")
    for flag, value in (("--job-name", args.job_name), ("--partition", args.partition)):
        if value is not None and not _SLURM_WORD.fullmatch(value):
            raise _bad(flag, value, "allowed: letters, digits and _ . , -")
    if not _SLURM_TIME.fullmatch(args.time):
        raise _bad("--time", args.time, "allowed: minutes or [days-]hours:minutes:seconds "
                   "(90, 24:00:00, 2-00:00:00)")
    workdir = _slurm_workdir(args.workdir, args.nodes)
    _check_config(args.config)
    _check_train_args(train_args, forbidden=_OWN_FLAGS + _PER_PROCESS_FLAGS)

    q = shlex.quote
    values = {
            "JOB_NAME": args.job_name,
            "NODES": str(args.nodes),
            "GPUS_PER_NODE": str(args.gpus_per_node),
            "NTASKS_PER_NODE": str(LAYOUTS[args.layout](args.gpus_per_node)),
            "LAYOUT": args.layout,
            "PARTITION": args.partition,
            "TIME": args.time,
            "CPUS_PER_TASK": None if args.cpus_per_task is None else str(args.cpus_per_task),
            "PORT": _JOB_PORT if args.port is None else str(args.port),
            "CHDIR": q(os.path.abspath(args.chdir)),
            "PYTHON": q(args.python),
            "CONFIG": q(args.config),
            "WORKDIR": q(workdir),
            "TRAIN_ARGS": shlex.join(train_args),
    }
    if template is None:
        with open(SLURM_TEMPLATE) as f:
            template = f.read()
    lines = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise AssertionError(f"{SLURM_TEMPLATE}: unknown placeholder(s) {unknown}")
        if any(values[n] is None for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line).rstrip())
    return "\n".join(lines) + "\n"


def run_slurm(args, train_args: list[str]) -> None:
    script = render_slurm(args, train_args)
    if args.dry_run:
        sys.stdout.write(script)
        return
    if args.output:
        path = args.output
    else:  # sbatch keeps its own copy of the script; this one is for the record
        fd, path = tempfile.mkstemp(prefix=f"{args.job_name}-", suffix=".sbatch")
        os.close(fd)
    with open(path, "w") as f:
        f.write(script)
    if args.output:
        print(f"wrote {path}; submit it with: sbatch {shlex.quote(path)}")
        return
    if shutil.which("sbatch") is None:
        raise UsageError(f"sbatch is not on PATH (wrote the script to {path}); run this on "
                         "a SLURM login node, or use --output/--dry-run")
    print(f"wrote {path}", file=sys.stderr, flush=True)
    subprocess.run(["sbatch", path], check=True)


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
            prog="launch.py", description=__doc__.split("\n\n")[0],
            epilog="Flags after '--' go to train.py unchanged.")
    sub = parser.add_subparsers(dest="recipe", required=True)

    def common(p):
        p.add_argument("--config", required=True,
                       help="train.py --config, relative to the repository root "
                            "(configs/vit.py:s16)")
        p.add_argument("--workdir", required=True, help="train.py --workdir, shared by all hosts")
        p.add_argument("--dry-run", action="store_true",
                       help="print what would run and run nothing")

    tpu = sub.add_parser("tpu-vm", help="Cloud TPU VM pod slice (gcloud)")
    common(tpu)
    tpu.add_argument("--name", required=True, help="TPU VM name")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", help="gcloud project (default: gcloud's configured one)")
    tpu.add_argument("--create", action="store_true", help="create the TPU VM first")
    tpu.add_argument("--accelerator-type", help="with --create: v4-32, v5litepod-16, ...")
    tpu.add_argument("--version", help="with --create: the TPU VM runtime version")
    tpu.add_argument("--repo", help="git URL the workers clone this repository from")
    tpu.add_argument("--ref", default="HEAD",
                     help="branch, tag or commit to run (default: the remote's default branch)")
    tpu.add_argument("--remote-dir", default="attention-zoo",
                     help="checkout directory on the workers, relative to the home directory")
    tpu.add_argument("--python", default="python3",
                     help="Python on the workers (>= 3.11, setup.cfg's python_requires)")
    tpu.add_argument("--no-setup", action="store_true",
                     help="skip the clone/install step (workers already set up)")

    slurm = sub.add_parser("slurm", help="SLURM GPU cluster (sbatch + srun)")
    common(slurm)
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--layout", choices=sorted(LAYOUTS), default="per-gpu",
                       help="per-gpu: one process per GPU (--ntasks-per-node=GPUS); "
                            "per-node: one process per node driving all its GPUs")
    slurm.add_argument("--partition", help="default: the cluster's default partition")
    slurm.add_argument("--time", default="01:00:00", help="wall-clock limit (default 01:00:00)")
    slurm.add_argument("--job-name", default="zoo-train")
    slurm.add_argument("--cpus-per-task", type=int,
                       help="CPUs per process, for data loading (default: the cluster's)")
    slurm.add_argument("--port", type=int,
                       help="coordinator port (default: derived from the job id, as JAX does)")
    slurm.add_argument("--chdir", default=REPO_ROOT,
                       help="repository checkout on the shared filesystem (default: this one)")
    slurm.add_argument("--python", default="python",
                       help="Python with the package installed (default: python on the PATH "
                            "sbatch exports from the submitting shell)")
    slurm.add_argument("--output", help="write the script here and print its path instead of "
                                        "submitting it")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first `--` belongs to train.py, even flags launch.py also has.
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    train_args = argv[split + 1:]
    try:
        (run_tpu_vm if args.recipe == "tpu-vm" else run_slurm)(args, train_args)
    except UsageError as error:
        _fail(str(error))
    except subprocess.CalledProcessError as error:
        print(f"launch.py: {shlex.join(error.cmd)} failed with exit status {error.returncode}",
              file=sys.stderr, flush=True)
        sys.exit(error.returncode)


if __name__ == "__main__":
    main()

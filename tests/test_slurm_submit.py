"""Multi-GPU training under SLURM (issue 22): `--set-resources train:gpu=N` becomes one
SLURM task that sees N GPUs (`sbatch --gpus=N`, no --ntasks > 1; the train rule then starts
`accelerate launch --num_processes N` inside it). Asserted on the sbatch call the real
SLURM plugin generates, with a stand-in `sbatch` on PATH that records its arguments: no
cluster needed."""

import os
import shlex
import subprocess
import sys
import time

from helpers import ROOT

FAKE_SBATCH = """#!/bin/sh
printf '%s\\n' "$*" >> "$SBATCH_CALLS"
cat > /dev/null
echo 4242
"""


def test_train_with_n_gpus_is_one_task_with_n_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in {"sbatch": FAKE_SBATCH, "squeue": "#!/bin/sh\nsleep 30\n", "sinfo": "#!/bin/sh\n",
                       "sacct": "#!/bin/sh\nexit 1\n", "scontrol": "#!/bin/sh\n", "scancel": "#!/bin/sh\n",
                       "sacctmgr": "#!/bin/sh\necho acct\n", "sshare": "#!/bin/sh\necho acct\n"}.items():
        (bin_dir / tool).write_text(body)
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "Snakefile").write_text(
        'rule train:\n    output: "out/model"\n    threads: 1\n    resources: gpu=1\n'
        '    shell: "touch {output}"\n')
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CALLS": str(calls),
           "GRADLOC_SLURM_ACCOUNT": "acct", "GRADLOC_SLURM_GPU_PARTITION": "gpuq"}
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(ROOT / "profiles/slurm"), "--set-resources",
           "train:gpu=4", "train:slurm_partition=gpuq", "--slurm-logdir", str(tmp_path / "logs"), "--retries", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not calls.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert calls.exists(), out[-3000:]
    args = shlex.split(calls.read_text().splitlines()[0])
    assert "--gpus=4" in args, args
    # one task (SLURM's default when --ntasks is not given; the jobstep then runs `srun -n1`)
    assert all(a == "--ntasks=1" for a in args if a.startswith("--ntasks")), args
    assert "-p" in args and args[args.index("-p") + 1] == "gpuq" and "-A" in args, args

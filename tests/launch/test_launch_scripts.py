"""launch/: the Colab notebook, the Cloud TPU script and the SLURM script, checked offline.

No network, no gcloud, no accelerator: the shell scripts run against fake `gcloud` / `srun`
executables that record their arguments, and every config flag or preset the launch files
and their docs name is checked against configs/.
"""

import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
DOCS = os.path.join(REPO, "docs", "scaling.md")  # the guide to meshes, hosts and clusters
LAUNCH_FILES = (NOTEBOOK, TPU_POD, SLURM, DOCS)
SHELL_SCRIPTS = (TPU_POD, SLURM)

# Variables the scripts read from the environment; cleared so a caller's settings cannot leak in.
SCRIPT_VARS = (
  "TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION PROJECT EXTRA_CREATE_FLAGS REPO_URL GIT_REF "
  "REPO_DIR VENV_DIR PYTHON_VERSION CONFIG RUN_NAME BUCKET WORKDIR EXTRA_FLAGS LOG_FILE "
  "LOCAL_DIR DETACH MODULES VENV MESH_DATA MESH_FSDP GPUS_PER_NODE JAX_LOCAL_DEVICE_IDS "
  "MOUNT_DIR GCSFUSE_FLAGS STOP_WAIT"
).split()

# --config.<key>=<value>; a value is ${VAR:-default}, ${VAR}, quoted, or a bare word.
CONFIG_FLAG = re.compile(
  r"--config\.([A-Za-z_][\w.]*)="
  r"(\"?\$\{[^}]*\}\"?|\"[^\"$]*\"|'[^']*'|[^\s\"'`}]*)"
)
# --config=configs/<file>.py[:args], and the CONFIG defaults of the shell scripts.
PRESET = re.compile(
  r"(?:--config=|CONFIG\s*=\s*|CONFIG:-)[\"']?(configs/[\w/]+\.py)(?::([\w=,.\-]+))?"
)


def load_notebook() -> dict:
  with open(NOTEBOOK) as f:
    return json.load(f)


def cell_text(cell: dict) -> str:
  source = cell["source"]
  return source if isinstance(source, str) else "".join(source)


def launch_text(path: str) -> str:
  if path.endswith(".ipynb"):
    return "\n".join(cell_text(c) for c in load_notebook()["cells"])
  with open(path) as f:
    return f.read()


def flat_defaults(c, prefix: str = "") -> dict:
  out = {}
  for key, value in c.items():
    if hasattr(value, "items"):
      out.update(flat_defaults(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def literal_value(raw: str) -> str | None:
  """The value a shell or IPython line passes, or None when only known at run time."""
  raw = raw.strip("\"'")
  match = re.fullmatch(r"\$\{\w+:-(.*)\}", raw)
  if match:
    return match.group(1)
  if "$" in raw or "{" in raw:
    return None
  return raw


def check_type(key: str, default, value: str) -> None:
  if isinstance(default, bool):
    assert value.lower() in ("true", "false", "1", "0"), f"--config.{key}={value}: not a bool"
  elif isinstance(default, int):
    int(value)
  elif isinstance(default, float):
    float(value)
  else:
    assert isinstance(default, str), f"--config.{key}: {type(default).__name__} is not a flag"


# ---- the notebook


def test_notebook_is_nbformat_4_with_empty_outputs():
  nb = load_notebook()
  assert {"cells", "metadata", "nbformat", "nbformat_minor"} <= set(nb)
  assert nb["nbformat"] == 4
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  ids = []
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["metadata"], dict) and isinstance(cell_text(cell), str)
    if nb["nbformat_minor"] >= 5:
      assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell["id"])
      ids.append(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  assert len(ids) == len(set(ids)), "cell ids must be unique"


def test_notebook_code_cells_compile_as_ipython_reads_them():
  """Shell (`!`) and magic (`%`) lines, indented ones too, become calls, as in the kernel."""
  from IPython.core.inputtransformer2 import TransformerManager

  code = [c for c in load_notebook()["cells"] if c["cell_type"] == "code"]
  assert code
  for cell in code:
    python = TransformerManager().transform_cell(cell_text(cell))
    compile(python, f"<code cell {cell['id']}>", "exec")


def test_notebook_installs_trains_watches_and_samples():
  """The parameters' defaults are a Colab user's: the S preset for 2000 steps in
  /content/runs/llama_s, installed with jax[tpu]; the cells use them."""
  text = launch_text(NOTEBOOK)
  for needle in (
    'REPO_URL = "https://github.com/<you>/fourfold.git"',
    'REPO_DIR = "/content/fourfold"',
    "INSTALL = True",
    'CONFIG = "configs/llama.py:size=S"',
    "STEPS = 2000",
    'RUNS = "/content/runs"',
    'RUN_NAME = "llama_s"',
    'EXTRA_FLAGS = "--config.model.dtype=bfloat16"',
    "git clone -q {REPO_URL} {REPO_DIR}",
    "pip install -q -e . 'jax[tpu]'",
    "jax.devices()",
    "python -m train.main --config={CONFIG} --workdir={WORKDIR} --config.train.steps={STEPS} "
    "{EXTRA_FLAGS}",
    "%load_ext tensorboard",
    "%tensorboard --logdir {RUNS}",
    'f"{WORKDIR}/metrics.jsonl"',
    "python -m eval.sample --workdir={WORKDIR}",
    "drive.mount",
  ):
    assert needle in text, needle
  (params,) = [c for c in load_notebook()["cells"] if "parameters" in c["metadata"].get("tags", ())]
  assert "REPO_URL" in cell_text(params)


# ---- flags and presets named anywhere in the launch files


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=os.path.basename)
def test_every_config_flag_is_a_base_config_key_with_a_value_of_its_type(path):
  defaults = flat_defaults(base.get_config())
  flags = CONFIG_FLAG.findall(launch_text(path))
  assert flags, f"{path}: no --config.<key>= flags found"
  for key, raw in flags:
    assert key in defaults, f"{os.path.basename(path)}: --config.{key} is not in configs/base.py"
    value = literal_value(raw)
    if value is not None:
      check_type(key, defaults[key], value)


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=os.path.basename)
def test_every_named_preset_exists_and_loads_with_its_arguments(path):
  presets = PRESET.findall(launch_text(path))
  assert presets, f"{path}: no --config=configs/... preset found"
  for file, arg in presets:
    assert os.path.isfile(os.path.join(REPO, file)), file
    module = importlib.import_module(file[: -len(".py")].replace("/", "."))
    config = module.get_config(arg) if arg else module.get_config()
    assert set(flat_defaults(config)) == set(flat_defaults(base.get_config())), file


def test_flag_parsing_resolves_shell_defaults_and_catches_bad_values():
  flags = CONFIG_FLAG.findall(
    'x --config.mesh.data="${MESH_DATA:--1}" --config.train.steps=${STEPS} '
    "--config.model.dtype=bfloat16}"
  )
  assert flags == [
    ("mesh.data", '"${MESH_DATA:--1}"'),
    ("train.steps", "${STEPS}"),
    ("model.dtype", "bfloat16"),
  ]
  assert [literal_value(raw) for _, raw in flags] == ["-1", None, "bfloat16"]
  with pytest.raises(ValueError):
    check_type("train.steps", 1000, "lots")
  assert PRESET.findall('CONFIG="${CONFIG:-configs/llama.py:size=1B}"') == [
    ("configs/llama.py", "size=1B")
  ]
  assert PRESET.findall('CONFIG = "configs/llama.py:size=S"  # the preset') == [
    ("configs/llama.py", "size=S")
  ]


# ---- the shell scripts


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=os.path.basename)
def test_shell_script_parses(path):
  result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=os.path.basename)
def test_shell_script_passes_shellcheck(path):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  result = subprocess.run(["shellcheck", "-s", "bash", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def fake_bin(tmp_path, name: str, body: str) -> str:
  """An executable `name` in tmp_path/bin that runs `body`; returns the directory."""
  directory = tmp_path / "bin"
  directory.mkdir(exist_ok=True)
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(directory)


def run_script(tmp_path, script: str, *args: str, **env: str) -> tuple:
  """Runs a launch script with fake gcloud/srun that record their argv; (result, calls)."""
  log = tmp_path / "calls"
  record = f"printf '%s\\0' \"$@\" >> {log}; printf '\\036' >> {log}\n"  # NUL after each arg
  bin_dir = fake_bin(tmp_path, "gcloud", record)
  srun = f"printf 'JAX_LOCAL_DEVICE_IDS=%s\\0' \"$JAX_LOCAL_DEVICE_IDS\" >> {log}\n"
  fake_bin(tmp_path, "srun", srun + record)
  clean = {
    k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM")
  }
  clean["PATH"] = bin_dir + os.pathsep + clean.get("PATH", "")
  result = subprocess.run(
    ["bash", script, *args], capture_output=True, text=True, env={**clean, **env}, cwd=tmp_path
  )
  calls = log.read_text().split("\x1e")[:-1] if log.exists() else []
  return result, [c.split("\0")[:-1] for c in calls]


@pytest.mark.parametrize("args", [(), ("bogus",)], ids=["none", "unknown"])
def test_tpu_pod_prints_usage_and_fails_without_a_known_subcommand(tmp_path, args):
  result, calls = run_script(tmp_path, TPU_POD, *args)
  assert result.returncode != 0
  assert "usage:" in result.stderr
  for sub in ("create", "setup", "mount", "train", "stop", "kill", "copy", "delete"):
    assert sub in result.stderr
  assert calls == [], "usage must not call gcloud"


def test_tpu_pod_create_and_delete_name_the_slice(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "create", TPU_NAME="pod1", ZONE="z1", PROJECT="p1")
  assert result.returncode == 0, result.stderr
  assert calls == [
    [
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "pod1",
      "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite",
      "--zone=z1",
      "--project=p1",
    ]
  ]
  result, calls = run_script(tmp_path, TPU_POD, "delete", TPU_NAME="pod1", ZONE="z1")
  assert result.returncode == 0, result.stderr
  assert calls[-1] == ["compute", "tpus", "tpu-vm", "delete", "pod1", "--quiet", "--zone=z1"]


def worker_command(call: list[str]) -> str:
  (command,) = [a for a in call if a.startswith("--command=")]
  return command[len("--command=") :]


def assert_worker_script_parses(command: str) -> None:
  """The --command string is read by the worker's login shell, then by bash."""
  assert command.startswith("bash -c ")
  checked = subprocess.run(
    ["sh", "-c", "bash -n -c " + command[len("bash -c ") :]], capture_output=True, text=True
  )
  assert checked.returncode == 0, checked.stderr


MOUNT = "/mnt/gcs/my-bucket"
GCSFUSE = f"gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket {MOUNT}"


def test_tpu_pod_train_mounts_the_bucket_and_runs_the_same_command_on_every_worker(tmp_path):
  result, calls = run_script(
    tmp_path,
    TPU_POD,
    "train",
    TPU_NAME="pod1",
    BUCKET="my-bucket",
    EXTRA_FLAGS="--config.train.steps=10",
  )
  assert result.returncode == 0, result.stderr
  assert "warning" not in result.stderr
  (call,) = calls
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in call
  command = worker_command(call)
  train = (
    "python -m train.main --config=configs/llama.py:size=1B "
    f"--workdir={MOUNT}/fourfold/runs/llama_1b --config.train.steps=10"
  )
  assert train in command
  # The mount (again, if the VMs restarted) comes before train.main, and only if missing.
  assert f"mountpoint -q {MOUNT}" in command and GCSFUSE in command
  assert command.index(GCSFUSE) < command.index(train)
  assert_worker_script_parses(command)


def test_tpu_pod_train_without_a_bucket_warns_on_a_multi_host_slice(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "train", ACCELERATOR_TYPE="v5litepod-16")
  assert result.returncode == 0, result.stderr
  assert "warning" in result.stderr and "single-host" in result.stderr
  command = worker_command(calls[0])
  assert "--workdir=/tmp/runs/llama_1b" in command and "gcsfuse" not in command
  for single_host in ("v5litepod-8", "v4-8", "v6e-4"):
    result, _ = run_script(tmp_path, TPU_POD, "train", ACCELERATOR_TYPE=single_host)
    assert result.returncode == 0 and "warning" not in result.stderr, single_host


def test_tpu_pod_train_refuses_a_url_workdir(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "train", WORKDIR="gs://b/runs/x")
  assert result.returncode == 2 and calls == []
  assert "not a URL" in result.stderr and "BUCKET=b" in result.stderr


def test_tpu_pod_setup_needs_a_repo_url_and_installs_on_every_worker(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "setup")
  assert result.returncode != 0 and "REPO_URL" in result.stderr and calls == []
  result, calls = run_script(tmp_path, TPU_POD, "setup", REPO_URL="https://example.com/f.git")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert "--worker=all" in call
  command = worker_command(call)
  assert "git clone -q https://example.com/f.git" in command and "jax[tpu]" in command
  assert "gcsfuse" not in command
  assert_worker_script_parses(command)


def test_tpu_pod_setup_with_a_bucket_installs_gcsfuse_and_mounts_it(tmp_path):
  result, calls = run_script(
    tmp_path, TPU_POD, "setup", REPO_URL="https://example.com/f.git", BUCKET="my-bucket"
  )
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert "--worker=all" in call
  command = worker_command(call)
  for needle in (
    "command -v gcsfuse",
    "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main",
    "https://packages.cloud.google.com/apt/doc/apt-key.gpg",
    "install gcsfuse",
    f"mountpoint -q {MOUNT}",
    GCSFUSE,
  ):
    assert needle in command, needle
  assert command.index("install gcsfuse") < command.index(GCSFUSE) < command.index("git clone")
  assert_worker_script_parses(command)


def run_on_worker(tmp_path, command: str, **env: str) -> subprocess.CompletedProcess:
  """Runs a --command string here as a worker's login shell would, with the fakes in bin/."""
  path = str(tmp_path / "bin") + os.pathsep + os.environ["PATH"]
  return subprocess.run(
    ["sh", "-c", command], capture_output=True, text=True, env={**os.environ, "PATH": path, **env}
  )


def test_tpu_pod_mount_runs_gcsfuse_only_where_the_bucket_is_not_mounted(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "mount")
  assert result.returncode == 2 and "BUCKET" in result.stderr and calls == []
  result, calls = run_script(tmp_path, TPU_POD, "mount", BUCKET="my-bucket")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert "--worker=all" in call
  command = worker_command(call)
  assert_worker_script_parses(command)
  # Run the worker script here against fakes: mountpoint answers from $MOUNTED.
  ran = tmp_path / "ran"
  record = f'echo "$(basename "$0") $*" >> {ran}\n'
  fake_bin(tmp_path, "mountpoint", record + '[ "$MOUNTED" = 1 ]\n')
  for name in ("stat", "gcsfuse", "sudo", "fusermount"):
    fake_bin(tmp_path, name, record)
  worker = run_on_worker(tmp_path, command, MOUNTED="0")
  assert worker.returncode == 0, worker.stderr
  assert ran.read_text().splitlines() == [
    f"mountpoint -q {MOUNT}",
    f"fusermount -u -z {MOUNT}",
    f"sudo mkdir -p {MOUNT}",
    f"sudo chown {os.getuid()}:{os.getgid()} {MOUNT}",
    GCSFUSE,
  ]
  assert f"mounted gs://my-bucket at {MOUNT}" in worker.stdout
  ran.unlink()
  worker = run_on_worker(tmp_path, command, MOUNTED="1")
  assert worker.returncode == 0, worker.stderr
  # Mounted and answering: nothing to do.
  assert ran.read_text().splitlines() == [f"mountpoint -q {MOUNT}", f"stat {MOUNT}"]


def worker_pattern(command: str) -> str:
  (line,) = [x for x in command.split("\n") if "pattern=" in x]
  match = re.search(r"pattern='\\''(.*)'\\''$", line)
  assert match, line
  return match.group(1)


def test_tpu_pod_stop_sends_sigterm_to_train_main_on_every_worker_and_waits(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "stop", TPU_NAME="pod1", STOP_WAIT="30")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in call
  command = worker_command(call)
  assert_worker_script_parses(command)
  pattern = worker_pattern(command)
  assert "pkill -TERM -f" in command and "KILL" not in command.replace("SIGKILL it", "")
  # Run it here against fake pgrep/pkill: train.main runs at the first look, then has exited.
  ran = tmp_path / "ran"
  fake_bin(tmp_path, "pkill", f'printf "%s\\n" "$@" >> {ran}\n')
  fake_bin(tmp_path, "pgrep", f"[ ! -e {ran} ]\n")  # running until pkill has been called
  worker = run_on_worker(tmp_path, command)
  assert worker.returncode == 0, worker.stderr
  assert ran.read_text().splitlines() == ["-TERM", "-f", pattern]
  assert "saves a checkpoint" in worker.stdout and "exited" in worker.stdout
  # Nothing running: no signal.
  ran.unlink()
  fake_bin(tmp_path, "pgrep", "exit 1\n")
  worker = run_on_worker(tmp_path, command)
  assert worker.returncode == 0 and "not running" in worker.stdout and not ran.exists()


def test_tpu_pod_kill_sends_sigkill(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "kill")
  assert result.returncode == 0, result.stderr
  command = worker_command(calls[0])
  assert_worker_script_parses(command)
  assert 'pkill -KILL -f "$pattern"' in command
  assert worker_pattern(command) == worker_pattern(
    worker_command(run_script(tmp_path, TPU_POD, "stop")[1][-1])
  )


def test_stop_pattern_matches_train_main_and_not_the_shells_around_it(tmp_path):
  _, calls = run_script(tmp_path, TPU_POD, "stop")
  command = worker_command(calls[0])
  pattern = re.compile(worker_pattern(command))  # POSIX ERE; this one reads the same in Python
  for process in (
    "python -m train.main --config=configs/llama.py:size=1B --workdir=/mnt/gcs/b/r",
    "/home/me/fourfold-venv/bin/python3.12 -m train.main --config=configs/llama.py",
    "python -m train.main",
  ):
    assert pattern.search(process), process
  _, calls = run_script(tmp_path, TPU_POD, "train", DETACH="1")
  for process in (
    "bash -c " + worker_command(calls[-1])[len("bash -c ") :],  # the shell that started it
    "bash -c " + command[len("bash -c ") :],  # the shell that runs stop
    "python -m train.mainx",
    "python -m eval.sample --workdir=/tmp/runs/llama_1b",
    "tail -F /home/me/fourfold-train.log",
  ):
    assert not pattern.search(process), process
  # And pgrep reads it the same way (only looks; signals nothing).
  package = tmp_path / "fake" / "train"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "main.py").write_text("import time\ntime.sleep(60)\n")
  fake = subprocess.Popen([sys.executable, "-m", "train.main"], cwd=package.parent)
  shell = subprocess.Popen(["bash", "-c", "sleep 60; : python -m train.main"])
  try:
    for _ in range(50):
      found = subprocess.run(
        ["pgrep", "-f", pattern.pattern], capture_output=True, text=True
      ).stdout.split()
      if str(fake.pid) in found:
        break
      subprocess.run(["sleep", "0.1"])
    assert str(fake.pid) in found and str(shell.pid) not in found
  finally:
    fake.kill()
    shell.kill()
    fake.wait()
    shell.wait()


def test_tpu_pod_copy_fetches_a_local_workdir_from_worker_0_only(tmp_path):
  result, calls = run_script(tmp_path, TPU_POD, "copy", BUCKET="b", RUN_NAME="x")
  assert result.returncode == 0 and calls == []
  assert "gcloud storage cp -r gs://b/fourfold/runs/x runs/" in result.stderr
  local = str(tmp_path / "out")
  result, calls = run_script(
    tmp_path, TPU_POD, "copy", TPU_NAME="pod1", WORKDIR="/tmp/runs/x", LOCAL_DIR=local
  )
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert call[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert "--recurse" in call and "--worker=0" in call
  assert "pod1:/tmp/runs/x" in call and f"{local}/" in call
  assert os.path.isdir(local)


@pytest.mark.parametrize("path", (NOTEBOOK, TPU_POD, SLURM), ids=os.path.basename)
def test_no_launch_file_passes_a_url_workdir(path):
  """The launchers mount their bucket (gcsfuse) or use shared disks; a `gs://` workdir is the
  trainer's own route (docs/training.md), which docs/scaling.md may name."""
  text = launch_text(path)
  assert not re.search(r"(--workdir[= ]|WORKDIR=|WORKDIR:-)[\"']?\w+://", text)


def test_docs_describe_the_gcsfuse_mount_and_stopping_with_sigterm():
  text = launch_text(DOCS)
  for needle in (
    "gcsfuse --implicit-dirs",
    "$MOUNT_DIR/fourfold/runs/$RUN_NAME",
    "gcloud storage cp -r gs://$BUCKET/fourfold/runs/$RUN_NAME",
    "bash launch/tpu_pod.sh stop",
    "SIGTERM",
    "--signal=TERM@120",
    "scancel --signal=TERM",
  ):
    assert needle in text, needle


def sbatch_header() -> list[str]:
  with open(SLURM) as f:
    return [line.split()[1] for line in f if line.startswith("#SBATCH")]


def test_slurm_script_asks_for_sigterm_to_the_job_steps_before_the_time_limit():
  header = sbatch_header()
  assert "--signal=TERM@120" in header  # no B: prefix, which would signal the batch shell only
  assert "--time=24:00:00" in header


def slurm_train_args(tmp_path, **env: str) -> list[str]:
  """train.main's argv as the SLURM script passes it to srun (4 GPUs per node)."""
  (tmp_path / "calls").unlink(missing_ok=True)  # the fakes' record of an earlier run
  result, calls = run_script(
    tmp_path, SLURM, SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=REPO, WORKDIR="/shared/run", **env
  )
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert call[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3"
  args = call[1:]
  return args[args.index("python") :]


def test_slurm_script_starts_one_process_per_node_with_all_its_gpus_and_the_config_mesh(tmp_path):
  """No MESH_* set: no mesh flag, so the preset's default mesh (FSDP over every GPU)."""
  header = sbatch_header()
  for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"):
    assert option in header, option
  assert slurm_train_args(tmp_path) == [
    "python",
    "-m",
    "train.main",
    "--config=configs/llama.py:size=1B",
    "--workdir=/shared/run",
    "--config.model.dtype=bfloat16",
  ]


def test_slurm_script_passes_the_mesh_sizes_that_are_set(tmp_path):
  start = ["python", "-m", "train.main", "--config=configs/llama.py:size=1B"]
  start.append("--workdir=/shared/run")
  dtype = "--config.model.dtype=bfloat16"
  both = slurm_train_args(tmp_path, MESH_DATA="-1", MESH_FSDP="1")
  assert both == [*start, "--config.mesh.data=-1", "--config.mesh.fsdp=1", dtype]
  fsdp = slurm_train_args(tmp_path, MESH_FSDP="8")
  assert fsdp == [*start, "--config.mesh.fsdp=8", dtype]

"""slurm/ and accelerate_configs/ against a real SLURM on this machine.

    slurm/local_cluster.sh start && python -m pytest -q tests/test_slurm.py

The cluster (slurm/local_cluster.sh) is SLURM 22.05 with two slurmd "nodes" on this one
machine, each with two stand-in GPUs. Four CPU jobs go through slurm/one_node.sbatch at
once, three of train.py into one --output folder: one runs undisturbed (real `accelerate
launch`); one is requeued with `scontrol requeue` (SIGTERM) once it has a checkpoint; one
gets the early-warning signal with `scancel --signal=USR1 --batch`, what SLURM sends at
--signal=B:USR1@300 before the time limit (plain `python` as launcher, so train.py's own
exit status reaches the wrapper). Both must stop with a checkpoint mid-epoch, start again
by themselves with --resume auto and end with the undisturbed job's weights, bit for bit.
The fourth, finetune.py, gets the early warning through `accelerate launch`. The
multi-node wrapper runs on both nodes with `accelerate` replaced by a recorder, whose
argv Accelerate's own parser then reads; it and the one-node wrapper's recorded job are
submitted as the cluster comes up, and run while the other test files do.

Where no SLURM can be started (not root, not installed) the tests that need it are skipped
with the reason; .ci/run installs and starts it. The rest need no SLURM. The cluster and the
four jobs start with the session (start_early), when a selected test needs them, and run while
the other test files do.
"""
from __future__ import annotations

import os
import re
import sys
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

from fixres.checkpoint import RunFolder
from fixres.config import TrainConfig
from fixres.fileio import load_weights, save_weights, write_json_atomic
from fixres.preprocessing import weights_meta
from tests.conftest import COLOURS, ROOT, TINY_TRAIN, environ, make_csv_dataset, niced
from tests.script_runs import lower_autogroups_naming

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
EPOCHS = 8        # 15 steps an epoch: seconds of training left after the first checkpoint, to act in
# The wrappers run `python3` and `accelerate` from PATH: this interpreter's folder goes first, or a
# venv's python run without activating it would leave another python3 (without accelerate) first
OWN_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


# ----------------------------------------------------------------------------- accelerate_configs/

@pytest.mark.parametrize("name, distributed, processes, machines, precision, cpu", [
    ("cpu", "NO", 1, 1, "no", True),
    ("single_gpu", "NO", 1, 1, "bf16", False),
    ("one_node", "MULTI_GPU", 8, 1, "bf16", False),
    ("multi_node", "MULTI_GPU", 16, 2, "bf16", False),
])
def test_accelerate_configs_load_with_accelerates_loader(name, distributed, processes, machines, precision, cpu):
    path = ROOT / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.num_processes, config.num_machines, config.mixed_precision,
            config.use_cpu) == (distributed, processes, machines, precision, cpu)
    if name == "multi_node":  # the per-cluster fields are marked
        fill_in = [line.split(":")[0] for line in path.read_text().splitlines() if "FILL IN" in line and ":" in line]
        assert {"num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"} <= set(fill_in)


# ----------------------------------------------------------------------------- bad input, no SLURM needed

def wrapper(*args, env=None) -> subprocess.CompletedProcess:
    """The batch script run by bash as SLURM would, up to where it needs SLURM."""
    return subprocess.run(niced(["bash", "slurm/one_node.sbatch", *map(str, args)]), cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**environ(), "PATH": OWN_PATH, "SLURM_JOB_ID": "7", **(env or {})})


BAD_CONFIGS = [
    (None, "no such file"),
    ("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_procesess: 2\n", "unknown keys (['num_procesess'])"),
    ("num_processes: [2\n", "does not load: while parsing"),
]


def run_with_bad_configs(root: Path) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """The wrapper given each of BAD_CONFIGS (started with the session, in a thread): (config, result)."""
    done = []
    for i, (content, _) in enumerate(BAD_CONFIGS):
        config = root / str(i) / "config.yaml"
        config.parent.mkdir()
        if content is not None:
            config.write_text(content)
        done.append((config, wrapper("train.py", "--epochs", "1", env={"FIXRES_ACCELERATE_CONFIG": str(config)})))
    return done


@pytest.fixture
def bad_configs(early_runs):
    return early_runs["bad_configs"]


@pytest.mark.late
@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[f"{c}-{m}" for c, m in BAD_CONFIGS])
def test_bad_accelerate_config_is_one_line_before_anything_starts(bad_configs, case):
    config, result = bad_configs[case]
    message = BAD_CONFIGS[case][1]
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"error: accelerate config {config}: ")
    assert message in result.stderr


def test_wrapper_usage_errors():
    usage = wrapper()
    assert usage.returncode == 2 and "usage: sbatch slurm/one_node.sbatch train.py|finetune.py|sweep.py" in usage.stderr
    missing = wrapper("trian.py")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: trian.py: no such script (run sbatch from the fixres folder, or give its path)")
    outside = subprocess.run(["bash", "slurm/one_node.sbatch", "train.py"], cwd=ROOT, capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}, "PATH": OWN_PATH})
    assert outside.returncode == 2 and "submit it with sbatch" in outside.stderr


def test_resume_auto_with_a_name_takes_that_run_or_nothing(tmp_path):
    """What a requeued job relies on: its own run (--name), never the newest of another job."""
    state = {"w": torch.zeros(1)}
    RunFolder(tmp_path / "mine").save_checkpoint(name="epoch-0001-step-000003", state_dict=state, meta={}, training_state={})
    RunFolder(tmp_path / "other").save_checkpoint(name="epoch-0002-step-000006", state_dict=state, meta={}, training_state={})
    assert RunFolder.resolve_resume("auto", tmp_path, name="mine").path == tmp_path / "mine/checkpoints/epoch-0001-step-000003"
    assert RunFolder.resolve_resume("auto", tmp_path, name="new") is None
    assert RunFolder.resolve_resume("auto", tmp_path).run_folder.path == tmp_path / "other"  # without a name: the newest


# ----------------------------------------------------------------------------- the local SLURM

def slurm_env(conf: str, **extra) -> dict:
    return {**environ(), "PATH": OWN_PATH, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", **extra}


def start_cluster() -> tuple[str, list[str], bool]:
    """(SLURM_CONF, node names, whether started here) of the local cluster, started if it is not up.
    Run in a thread by start_early: its skips are raised in the tests that ask for `cluster`."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root (slurm/local_cluster.sh start)")
    started_here = False
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch")):
            pytest.skip("SLURM is not installed: `slurm/local_cluster.sh start` installs and starts it (.ci/run does)")
        # its daemons at the lowest priority; its jobs, each in a session of its own, are lowered as they run
        # (run_training_jobs: lower_autogroups_naming), so that they take the cores the other tests leave idle
        start = subprocess.run(["nice", "-n", "19", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
        if start.returncode != 0:
            pytest.skip(f"the local SLURM did not start: {(start.stderr or start.stdout).strip().splitlines()[-1:]}")
        started_here = True
    conf = subprocess.run([str(CLUSTER), "conf"], capture_output=True, text=True).stdout.strip()
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                           env=slurm_env(conf)).stdout.split()
    return conf, nodes, started_here


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: where a selected test needs them, the
    cluster comes up and the training jobs run in threads (their CPU time is slurmd's) while the
    other test files run, and the tests here wait only for what is not done by then."""
    if "bad_configs" in fixtures:  # python reads each config: seconds of a core this process leaves idle
        started.call("bad_configs", run_with_bad_configs, tmp_path_factory.mktemp("bad_configs"), real_runs=True)
    if "cluster" not in fixtures:
        return
    started.call("slurm_cluster", start_cluster)
    if "training_jobs" in fixtures:
        root = tmp_path_factory.mktemp("slurm_jobs")
        data = make_csv_dataset(root / "data", n_train=240, n_val=25)
        source = write_source_run(root / "source", data)  # not in the thread: it seeds torch's global RNG
        started.call("training_jobs", run_training_jobs, started, root, data, source)
    if "recorded_jobs" in fixtures:
        started.call("recorded_jobs", run_recorded_jobs, started, tmp_path_factory.mktemp("recorded_jobs"))
    started.at_end(stop_cluster, started)  # where this module's tests did not all run (-x)


def stop_cluster(started) -> None:
    """Once, in a thread the session waits for at its end: stops the local cluster if this session started it."""
    if "slurm_stop" in started:
        return
    for jobs in ("training_jobs", "recorded_jobs"):
        if jobs in started:
            started.outcome(jobs)
    cluster, error = started.outcome("slurm_cluster")
    if error is None and cluster[2]:
        started.call("slurm_stop", lambda: subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120))


@pytest.fixture(scope="session")  # this file's late tests read it after the other files' tests
def cluster(early_runs):
    """SLURM_CONF and node names of the running local cluster (start_early starts it if it is not
    up), once the training jobs have left it; stopped at the session's end if the session started it."""
    conf, nodes, _ = early_runs["slurm_cluster"]
    if "training_jobs" in early_runs:
        early_runs.outcome("training_jobs")  # they hold every CPU of the cluster: the jobs here would queue
    yield conf, nodes
    stop_cluster(early_runs)


def sbatch(env: dict, *args) -> str:
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return {key: (re.search(rf"\b{key}=(\S+)", out) or [None, None])[1] for key in ("JobState", "Restarts", "ExitCode")}


def every_second(function):
    """`function`, made to do its work at most once a second (a scan of /proc: lower_autogroups_naming)."""
    last = [0.0]

    def throttled():
        if time.monotonic() - last[0] >= 1:
            function()
            last[0] = time.monotonic()
    return throttled


def wait_done(env: dict, jobs: list[str], timeout: float = 300, meanwhile=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while any(job_state(env, j)["JobState"] not in DONE for j in jobs):
        assert time.monotonic() < deadline, f"jobs {jobs} not done after {timeout} s: " + \
            str({j: job_state(env, j) for j in jobs})
        meanwhile()
        time.sleep(0.5)


RECORDER = """#!/bin/bash
# stands in for `accelerate`: one file per node with its argv, one word a line
{ echo "$SLURMD_NODENAME $SLURM_NODEID"; printf '%s\\n' "$@"; } > "$FIXRES_RECORD/$SLURMD_NODENAME"
"""


def recorded_launch(record: Path) -> tuple[str, int, object]:
    """(node, SLURM_NODEID, accelerate launch's args as Accelerate itself parses them with the config)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    lines = record.read_text().splitlines()
    node, node_id = lines[0].split()
    assert lines[1] == "launch"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(lines[2:]))
    return node, int(node_id), args


def run_recorded_jobs(started, root: Path) -> dict:
    """The wrappers' jobs with `accelerate` replaced by RECORDER, submitted as the cluster comes up, in
    a thread that start_early starts: the one-node wrapper's, and the multi-node one's where the
    cluster has two nodes. SLURM runs them when CPUs are free (the training jobs hold them all for
    a while). {name: (job id, the folder of its records and log, its JobState)}."""
    conf, nodes, _ = started["slurm_cluster"]
    (root / "bin").mkdir()
    (root / "bin" / "accelerate").write_text(RECORDER)
    (root / "bin" / "accelerate").chmod(0o755)
    submit = {"one": ["--gpus-per-node=2", "slurm/one_node.sbatch", "sweep.py", "--checkpoint", "runs/x"]}
    if len(nodes) >= 2:
        submit["multi"] = ["--nodes=2", "--gpus-per-node=2", "slurm/multi_node.sbatch", "train.py", "--data",
                           "/data/train.csv", "--epochs", "90"]
    jobs, env, done = {}, {}, {}
    for name, args in submit.items():
        (root / name).mkdir()
        env[name] = slurm_env(conf, PATH=f"{root / 'bin'}{os.pathsep}{OWN_PATH}", FIXRES_RECORD=str(root / name))
        try:
            jobs[name] = sbatch(env[name], "--cpus-per-task=1", f"--output={root / name}/%j.out", *args)
        except AssertionError as err:  # that job's test fails with it; the other job goes on
            done[name] = (None, root / name, f"not submitted: {err}")
    lower = every_second(lambda: lower_autogroups_naming(str(root)))  # the session's background priority
    for name, job in jobs.items():  # each with a timeout of its own (they cannot run at once: 2 GPUs a node)
        try:
            wait_done(env[name], [job], timeout=300, meanwhile=lower)  # queued behind the training jobs
        except AssertionError as err:
            done[name] = (job, root / name, str(err))
        else:
            done[name] = (job, root / name, job_state(env[name], job)["JobState"])
    return done


@pytest.fixture(scope="session")
def recorded_jobs(cluster, early_runs) -> dict:
    """run_recorded_jobs' jobs (submitted as the session starts)."""
    return early_runs["recorded_jobs"]


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_multi_node_wrapper_launches_one_accelerate_per_node_with_its_rank(cluster, recorded_jobs):
    conf, nodes = cluster
    if len(nodes) < 2:
        pytest.skip(f"the local cluster has {len(nodes)} node(s); FIXRES_SLURM_NODES=2 (the default) gives two")
    multi, folder, state = recorded_jobs["multi"]
    assert state == "COMPLETED", (state, [p.read_text() for p in folder.glob("*.out")])

    launches = sorted(recorded_launch(folder / node) for node in nodes[:2])
    head = subprocess.run(["scontrol", "show", "hostnames", ",".join(nodes[:2])], env=slurm_env(conf),
                          capture_output=True, text=True).stdout.split()[0]
    assert [(node, rank) for node, rank, _ in launches] == [(nodes[0], 0), (nodes[1], 1)]
    for node, rank, args in launches:
        assert args.machine_rank == rank and args.num_machines == 2
        assert args.num_processes == 4                       # 2 nodes x 2 GPUs: the total
        assert args.main_process_ip == head == nodes[0]      # the head node's address on every node
        assert args.main_process_port == launches[0][2].main_process_port
        assert args.multi_gpu and args.mixed_precision == "bf16"  # from accelerate_configs/multi_node.yaml
        assert args.training_script == "train.py"
        assert args.training_script_args == ["--data", "/data/train.csv", "--epochs", "90", "--name", f"train-{multi}"]


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_one_node_wrapper_takes_the_gpu_count_from_slurm(recorded_jobs):
    job, folder, state = recorded_jobs["one"]
    assert state == "COMPLETED", (state, [p.read_text() for p in folder.glob("*.out")])
    [record] = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".out")]
    _, _, args = recorded_launch(record)
    assert args.config_file == "./accelerate_configs/one_node.yaml"
    assert args.num_processes == 2 and args.multi_gpu and args.mixed_precision == "bf16"
    assert args.training_script_args == ["--checkpoint", "runs/x"]  # sweep.py: no --name, no --resume


@pytest.fixture(scope="session")
def training_jobs(cluster, early_runs):
    """run_training_jobs' jobs, logs, runs and final job states (started as the session starts)."""
    return early_runs["training_jobs"]


def run_training_jobs(started, root: Path, data: Path, source: Path):
    """Three CPU jobs of train.py at once through slurm/one_node.sbatch into one --output, and one of
    finetune.py; three are disturbed as soon as they have their first checkpoint.
    Returns ({name: job id}, {name: log}, runs, {name: job_state at the end})."""
    conf, _, _ = started["slurm_cluster"]
    env = slurm_env(conf)
    runs = root / "runs"
    submit = ["--gpus-per-node=0", "--cpus-per-task=1", f"--output={root}/%j.out", "slurm/one_node.sbatch",
              "train.py", "--data", data, *TINY_TRAIN, "--epochs", EPOCHS, "--output", runs]
    jobs = {}
    try:
        for name in ("plain", "requeued"):
            jobs[name] = sbatch(env, "--job-name", name, *submit)
        # this one without `accelerate launch` (FIXRES_LAUNCHER): train.py's own exit status 75 reaches the wrapper
        jobs["warned"] = sbatch({**env, "FIXRES_LAUNCHER": sys.executable}, "--job-name", "warned", *submit)
        # --resume auto and --name given: the wrapper adds nothing, and the first start has nothing to resume
        jobs["finetune"] = sbatch(env, "--job-name", "finetune", *submit[:4], "finetune.py", "--checkpoint", source,
                                  "--res", "40", "--aug", "test", "--epochs", EPOCHS, "--batch-size", "16",
                                  "--workers", "0", "--name", "ft", "--resume", "auto")
        disturb = {"requeued": ["scontrol", "requeue", jobs["requeued"]],
                   "warned": ["scancel", "--signal=USR1", "--batch", jobs["warned"]],
                   "finetune": ["scancel", "--signal=USR1", "--batch", jobs["finetune"]]}
        run_dirs = {name: runs / f"train-{job}" for name, job in jobs.items()}
        run_dirs["finetune"] = root / "ft"  # finetune.py's default --output: beside the source run
        # the jobs' processes, each job in a session of its own, at the priority of the session's background runs
        lower_jobs = every_second(lambda: lower_autogroups_naming(str(root)))
        deadline = time.monotonic() + 240
        while disturb:
            for name, command in list(disturb.items()):
                if RunFolder(run_dirs[name]).checkpoints():   # epoch 1 done: training, handlers installed
                    subprocess.run(command, env=env, check=True, timeout=30)
                    del disturb[name]
            assert time.monotonic() < deadline, f"no checkpoint after 240 s: {list(runs.glob('*/*'))}"
            lower_jobs()
            time.sleep(0.1)
        wait_done(env, list(jobs.values()), meanwhile=lower_jobs)
    except BaseException:
        if jobs:  # none left to hold the cluster's CPUs from the other tests
            subprocess.run(["scancel", *jobs.values()], env=env, capture_output=True, timeout=30)
        raise
    states = {name: job_state(env, job) for name, job in jobs.items()}  # now: slurmctld forgets a job 300 s after
    logs = {name: (root / f"{job}.out").read_text() for name, job in jobs.items()}
    return jobs, logs, runs, states


def write_source_run(folder: Path, data: Path) -> Path:
    """A run folder as train.py writes it, for finetune.py (untrained weights: nothing here needs accuracy)."""
    import timm
    torch.manual_seed(0)
    cfg = TrainConfig(data=str(data), model="test_resnet", train_res=32)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", cfg.to_dict())
    model = timm.create_model("test_resnet", num_classes=len(COLOURS))
    save_weights(folder / "best.safetensors", model.state_dict(), weights_meta(cfg, sorted(COLOURS)))
    return folder


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_job_through_the_wrapper_writes_its_run_folder(training_jobs):
    jobs, logs, runs, states = training_jobs
    log = logs["plain"]
    assert states["plain"] == {"JobState": "COMPLETED", "Restarts": "0", "ExitCode": "0:0"}, log
    assert "accelerate launch --quiet --config_file ./accelerate_configs/cpu.yaml --num_processes 1" in log
    assert len(re.findall(r"^epoch +\d+ \|", log, re.M)) == EPOCHS
    run = runs / f"train-{jobs['plain']}"                 # the wrapper's name: <script>-<job id>
    assert [line.count('"epoch"') for line in (run / "metrics.jsonl").read_text().splitlines()] == [1] * EPOCHS
    for name in ("config.json", "classes.json", "best.safetensors", "last.safetensors"):
        assert (run / name).is_file(), name
    assert load_weights(run / "last.safetensors")[1]["epoch"] == EPOCHS


def assert_resumed_with_the_same_weights(jobs, logs, runs, states, name):
    log = logs[name]
    assert states[name] == {"JobState": "COMPLETED", "Restarts": "1", "ExitCode": "0:0"}, log
    # mid-epoch: the stop came during training, so the resumed run skips the batches already trained
    resumed = re.search(r"resumed from \S+ at epoch (\d+), batch (\d+)", log)
    assert resumed and 1 < int(resumed[1]) <= EPOCHS and int(resumed[2]) > 0, log[-3000:]
    second_start = re.search(rf"^fixres: job {jobs[name]}, start 2, .*$", log, re.M)
    assert second_start and second_start[0].endswith(f"--name train-{jobs[name]} --resume auto"), log[-3000:]
    run = runs / f"train-{jobs[name]}"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    expected, _ = load_weights(runs / f"train-{jobs['plain']}" / "last.safetensors")
    got, _ = load_weights(run / "last.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    return log


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_requeued_job_resumes_from_its_checkpoint_with_the_same_weights(training_jobs):
    log = assert_resumed_with_the_same_weights(*training_jobs, "requeued")
    assert "DUE TO JOB REQUEUE" in log
    assert re.search(r"stopped by SIGTERM: checkpoint saved at epoch \d+, batch \d+", log), log[-3000:]


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_early_warning_checkpoints_requeues_itself_and_finishes(training_jobs):
    log = assert_resumed_with_the_same_weights(*training_jobs, "warned")
    assert "fixres: USR1 (time limit near)" in log
    assert re.search(r"stopped by SIGUSR1: checkpoint saved at epoch \d+, batch \d+", log), log[-3000:]
    assert "the training stopped after the early warning (exit 75): requeueing job" in log
    assert "accelerate launch" not in log  # FIXRES_LAUNCHER replaced it and its flags
    assert "DUE TO JOB REQUEUE" not in log.split("requeueing job")[0]  # it was the job itself that requeued


@pytest.mark.slow
@pytest.mark.late  # the jobs run beside the other files' tests
def test_finetune_job_stops_on_the_warning_and_resumes_its_own_run(training_jobs):
    jobs, logs, runs, states = training_jobs
    log = logs["finetune"]
    assert states["finetune"] == {"JobState": "COMPLETED", "Restarts": "1", "ExitCode": "0:0"}, log
    assert re.search(r"stopped by SIGUSR1: checkpoint saved at epoch \d+, batch \d+", log), log[-3000:]
    run = runs.parent / "ft"
    assert log.count(f"--resume auto: no checkpoint under {run}/, starting fresh") == 1
    assert re.search(rf"resumed from {run}/checkpoints/\S+ at epoch \d+, batch [1-9]", log), log[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert (run / "finetune.json").is_file() and load_weights(run / "last.safetensors")[1]["test_res"] == 40

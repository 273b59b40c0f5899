"""A real Slurm on this machine: `sbatch --wait launch/slurm.sbatch`, as a cluster user runs it.

The module fixture installs Debian's slurm-wlm, munge and libpmix-dev with apt-get
when they are missing (root only: otherwise the tests skip, saying why), writes a
one-node slurm.conf into a temporary directory and starts munged, slurmctld and slurmd
there in the foreground, each on its own ports and files, so it disturbs no other
Slurm. Every daemon it started is stopped by pid at the end, whatever happened.

libpmix-dev: Debian's mpi/pmix plugin loads the unversioned libpmix.so, which only
that package installs; without it `srun --mpi=pmix` cannot start any step, and the
sbatch script falls back to mpirun inside the allocation (tested here as well).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from launching import REPO_ROOT, mpi_env

from ppruntime import LLM, SamplingParams

# the first run on a machine installs Slurm: more than the suite's default per-test limit
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

SLURM_PACKAGES = ("slurm-wlm", "munge")
PMIX_PACKAGE = "libpmix-dev"  # for srun --mpi=pmix on Debian (see above); optional
APT_TIMEOUT_S = 900  # once per machine
DAEMON_START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 240  # a whole job, start-up included, on a loaded machine
ENDS_WITHIN_S = 60  # after scancel or kill -9
SBATCH = REPO_ROOT / "launch" / "slurm.sbatch"
PROMPTS = [json.loads(line)["prompt"] for line in (REPO_ROOT / "examples" / "prompts.jsonl").open()]
KNOWN_WORDS = set(
    re.findall(r"[a-z]+", (REPO_ROOT / "data/kjv/genesis-matthew.txt").read_text().lower())
)
# What makes the cluster of the README a test cluster of one CPU node.
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
# A run that would last far longer than ENDS_WITHIN_S if nothing stopped it.
LONG_RUN_ENV = {
    "PRESET": "tiny",
    "MAX_TOKENS": "1900",
    "EXTRA_ARGS": "--ignore-eos",
    "PPRUNTIME_STAGE_DELAY_MS": "1:100",  # >= 190 s for 1900 tokens
}


# =====================================================================================
# installing Slurm and running its daemons
# =====================================================================================
def _missing_packages(packages: tuple[str, ...]) -> list[str]:
    missing = []
    for package in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


def _apt_install(packages: list[str]) -> str | None:
    """apt-get update && apt-get install; what went wrong, if anything."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", *packages],
    ):
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} did not finish in {APT_TIMEOUT_S} s"
        if result.returncode != 0:
            return f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-2000:]}"
    return None


def _install_slurm() -> str | None:
    """Install what is missing; the reason to skip when Slurm cannot run here."""
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        return "needs Debian's slurm-wlm and munge: no dpkg/apt-get on this machine"
    if os.geteuid() != 0:
        return "needs root: the test cluster runs its daemons and jobs as root (SlurmUser=root)"
    missing = _missing_packages((*SLURM_PACKAGES, PMIX_PACKAGE))
    error = _apt_install(missing) if missing else None
    if error is not None and _missing_packages(SLURM_PACKAGES):
        return error
    return None  # without libpmix-dev, the script's auto-detection picks mpirun


def _pmix_works() -> bool:
    return not _missing_packages((PMIX_PACKAGE,))


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # all held at once: distinct ports
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    ctld_port, slurmd_port = _free_ports(2)
    return f"""\
ClusterName=pptest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# a container: no cgroups, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
InactiveLimit=0
# `sbatch --wait` polls slurmctld after 2 s, then every 4x longer up to 32 s while that
# stays under MinJobAge/2: 4 keeps it at 2 s (a job that ends at 12 s is noticed at
# 14 s, not at 42 s); a finished job's record then lives only seconds, so the tests
# read its EndTime as soon as it ends (see ended_jobs)
MinJobAge=4
# seconds between the SIGTERM of scancel and the SIGKILL
KillWait=10
# 16 CPUs whatever this machine has: every job of the tests runs at once
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurm:
    """munged, slurmctld and slurmd of a one-node cluster living in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge.socket"
        self.daemons: dict[str, subprocess.Popen] = {}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A submitting user's environment (sbatch passes it to the job)."""
        return mpi_env({"SLURM_CONF": str(self.conf), **(extra or {})})

    def start(self) -> None:
        for directory in ("state", "spool"):
            (self.root / directory).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._daemon(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}"]
            + [f"--key-file={key}", f"--pid-file={self.root}/munged.pid"]
            + [f"--log-file={self.root}/munged.log", f"--seed-file={self.root}/munged.seed"],
        )
        self._wait_for(self._munge_works, "munged")
        self.conf.write_text(_slurm_conf(self.root, self.host, self.munge_socket))
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(self._node_idle, "slurmd registered with slurmctld, node idle")

    def stop(self) -> None:
        """Cancel what is left, then end every daemon started here, by pid."""
        if "slurmctld" in self.daemons:
            self.run(["scancel", "--quiet", "--full", "--partition=debug"], check=False)
            deadline = time.monotonic() + 30
            while self.run(["squeue", "-h"], check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, capture_output=True, text=True, env=self.env(), timeout=60)
        if check:
            assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result

    def logs(self) -> str:
        texts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                texts.append(f"--- {name} (tail) ---\n{path.read_text()[-3000:]}")
        return "\n".join(texts)

    def _daemon(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.out").open("w")
        self.daemons[name] = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )
        log.close()

    def _munge_works(self) -> bool:
        encoded = subprocess.run(
            ["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10
        )
        return encoded.returncode == 0

    def _node_idle(self) -> bool:
        return self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle"

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while not condition():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    output = (self.root / f"{name}.out").read_text()
                    raise AssertionError(f"{name} exited {proc.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {DAEMON_START_TIMEOUT_S} s\n{self.logs()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    reason = _install_slurm()
    if reason is not None:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# =====================================================================================
# jobs
# =====================================================================================
@dataclass
class Job:
    """One `sbatch --wait launch/slurm.sbatch` and its files."""

    cluster: LocalSlurm
    directory: Path
    proc: subprocess.Popen
    job_id: str
    stopped_at: float = 0.0  # epoch seconds of the scancel / kill -9, if any

    @property
    def output(self) -> Path:  # the responses (OUTPUT)
        return self.directory / "responses.jsonl"

    @property
    def log_dir(self) -> Path:  # per-rank logs (LOG_DIR)
        return self.directory / "logs"

    @property
    def job_out(self) -> str:  # what the batch script printed (sbatch --output)
        path = self.directory / f"job-{self.job_id}.out"
        return path.read_text() if path.exists() else ""

    def responses(self) -> list[dict]:
        return [json.loads(line) for line in self.output.read_text().splitlines()]

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> int:
        """sbatch's exit status: the job's."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run(["scancel", self.job_id], check=False)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"job {self.job_id} ran past {timeout} s\n{self.describe()}"
            ) from None
        return self.proc.returncode

    def wait_generating(self) -> None:
        """Until rank 0's engine is up (then every prompt is admitted at once)."""
        rank0 = self.log_dir / "rank-0.log"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (rank0.exists() and "microbatch slots" in rank0.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the engine did not start\n{self.describe()}")
            time.sleep(0.5)

    def rank_pid(self, rank: int) -> int:
        """The pid of MPI rank `rank` of this job (found by its environment)."""
        wanted = {f"SLURM_JOB_ID={self.job_id}".encode(), f"PMIX_RANK={rank}".encode()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                environ = set((entry / "environ").read_bytes().split(b"\0"))
                if b"generate" in cmdline and b"ppruntime" in cmdline and wanted <= environ:
                    return int(entry.name)
        raise AssertionError(f"no rank {rank} of job {self.job_id}\n{self.describe()}")

    def describe(self) -> str:
        logs = ""
        for path in sorted(self.log_dir.glob("rank-*.log")) if self.log_dir.exists() else []:
            logs += f"--- {path.name} (tail) ---\n{path.read_text()[-2000:]}\n"
        return f"--- job output ---\n{self.job_out[-4000:]}\n{logs}{self.cluster.logs()}"


def submit(slurm: LocalSlurm, directory: Path, env: Mapping[str, str]) -> Job:
    """`sbatch --wait` the script from the repository root, its files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    job_env = {
        "PPRUNTIME_DEVICE": "cpu",
        "LOG_DIR": str(directory / "logs"),
        "OUTPUT": str(directory / "responses.jsonl"),
        **env,
    }
    args = ["sbatch", "--wait", "--parsable", *ONE_NODE, "--time=00:10:00"]
    args += [f"--output={directory}/job-%j.out", str(SBATCH)]
    proc = subprocess.Popen(
        args,
        cwd=str(REPO_ROOT),  # the submit directory: REPO, holding .venv/ and examples/
        env=slurm.env(job_env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    readable, _, _ = select.select([proc.stdout], [], [], 60)
    job_id = proc.stdout.readline().strip() if readable else ""
    if not job_id.isdigit():
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"sbatch did not submit: {job_id!r} {stderr}\n{slurm.logs()}")
    return Job(slurm, directory, proc, job_id)


JOB_ENVS: dict[str, dict[str, str]] = {
    # the script's defaults: examples/prompts.jsonl, the built-in tiny-trained model
    "defaults": {"MAX_TOKENS": "24"},
    # the random `tiny` preset (what the tests compare), ranks started by mpirun
    "mpirun": {"PRESET": "tiny", "MAX_TOKENS": "12", "MPI_LAUNCH": "mpirun"},
    "missing-model": {"MODEL": "{root}/no-such-model"},
    "scancel": LONG_RUN_ENV,
    "kill": LONG_RUN_ENV,
}
FINISHING = ("defaults", "mpirun", "missing-model")
STOPPED = ("scancel", "kill")


@pytest.fixture(scope="module")
def jobs(slurm: LocalSlurm, tmp_path_factory) -> dict[str, Job]:
    """Every job of this module, submitted at once (most of a job is start-up); the long
    runs are stopped as soon as they generate: one by scancel, one by kill -9 of rank 1.
    """
    root = tmp_path_factory.mktemp("jobs")
    submitted = {}
    for name, env in JOB_ENVS.items():
        env = {key: value.replace("{root}", str(root)) for key, value in env.items()}
        submitted[name] = submit(slurm, root / name, env)
    cancelled, killed = submitted["scancel"], submitted["kill"]
    cancelled.wait_generating()
    killed.wait_generating()
    time.sleep(2)  # a few decode steps of both
    victim = killed.rank_pid(1)
    cancelled.stopped_at = time.time()
    slurm.run(["scancel", cancelled.job_id])
    killed.stopped_at = time.time()
    os.kill(victim, signal.SIGKILL)
    return submitted


# JobState of a job that has ended (its EndTime is then when; before, it is the limit)
ENDED_STATES = {"COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
ENDED_STATES |= {"OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _end_times(cluster: LocalSlurm) -> dict[str, float]:
    """job id -> when it ended (epoch seconds, whole seconds), for every finished job
    slurmctld still has a record of."""
    records = cluster.run(["scontrol", "show", "job", "--oneliner"], check=False).stdout
    ended = {}
    for record in records.splitlines():
        job_id = re.search(r"\bJobId=(\d+)", record)
        state = re.search(r"\bJobState=(\S+)", record)
        end = re.search(r"\bEndTime=(\d{4}-\S+)", record)
        if job_id and state and end and state.group(1) in ENDED_STATES:
            when = datetime.datetime.strptime(end.group(1), "%Y-%m-%dT%H:%M:%S")
            ended[job_id.group(1)] = when.timestamp()
    return ended


@pytest.fixture(scope="module")
def ended_jobs(slurm: LocalSlurm, jobs: dict[str, Job]) -> dict[str, tuple[int, float | None]]:
    """Every job to its end: name -> (sbatch --wait's exit status, slurmctld's EndTime of
    a stopped job). The EndTime is read while the job's record is there (MinJobAge: the
    jobs were stopped just now); sbatch notices an end at its next poll (2 s at most)."""
    end_times: dict[str, float] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(end_times) < len(STOPPED) and time.monotonic() < deadline:
        ended = _end_times(slurm)
        end_times.update(
            {name: ended[jobs[name].job_id] for name in STOPPED if jobs[name].job_id in ended}
        )
        time.sleep(0.5)
    # a job past its time fails in its wait, named
    return {
        name: (job.wait(max(1.0, deadline - time.monotonic())), end_times.get(name))
        for name, job in jobs.items()
    }


@pytest.fixture(scope="module")
def finished_jobs(jobs, ended_jobs) -> dict[str, tuple[Job, int]]:
    """The jobs that run to their end: name -> (job, exit status)."""
    return {name: (jobs[name], ended_jobs[name][0]) for name in FINISHING}


@dataclass
class Stopped:
    job: Job
    status: int  # sbatch --wait's
    took_s: float  # from the scancel / kill -9 to the job's end (slurmctld's EndTime)


@pytest.fixture(scope="module")
def stopped_jobs(jobs, ended_jobs) -> dict[str, Stopped]:
    """The long runs. Their end comes from slurmctld: `sbatch --wait` notices it only at
    its next poll."""
    stopped = {}
    for name in STOPPED:
        job = jobs[name]
        status, end_time = ended_jobs[name]
        assert end_time is not None, f"no EndTime seen for job {job.job_id}\n{job.describe()}"
        stopped[name] = Stopped(job, status, end_time - job.stopped_at)
    return stopped


# =====================================================================================
# the tests
# =====================================================================================
def test_defaults_run_the_built_in_model(finished_jobs) -> None:
    job, status = finished_jobs["defaults"]
    assert status == 0, job.describe()
    # with libpmix-dev (installed above where apt-get could) the auto-detection picks
    # srun --mpi=pmix, else mpirun
    launch = "pmix" if _pmix_works() else "mpirun"
    expected = f"PP=2, ranks started with {launch}, model --preset tiny-trained"
    assert expected in job.job_out, job.describe()
    responses = job.responses()  # every line one JSON object
    assert [r["request_id"] for r in responses] == [f"req-{i}" for i in range(len(PROMPTS))]
    for response, prompt in zip(responses, PROMPTS):
        assert response["finish_reason"] == "length", response
        assert len(response["token_ids"]) == 24, response
        assert response["prompt_token_ids"][1:] == list(prompt.encode()), response
        words = re.findall(r"[a-z]+", response["text"].lower())[:-1]  # the last may be cut
        assert len(words) >= 3, response["text"]
        assert sum(w in KNOWN_WORDS for w in words) >= 0.9 * len(words), response["text"]
    for rank in (0, 1):
        log = (job.log_dir / f"rank-{rank}.log").read_text()
        assert f"[rank {rank}/2 " in log and f"stage {rank}/2" in log, log


def test_mpirun_inside_the_allocation_gives_the_tokens_of_one_process(finished_jobs) -> None:
    job, status = finished_jobs["mpirun"]
    assert status == 0, job.describe()
    assert "ranks started with mpirun" in job.job_out, job.describe()
    responses = job.responses()
    with LLM(preset="tiny", exit_workers=False) as llm:
        expected = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    assert [r["token_ids"] for r in responses] == [e.token_ids for e in expected]
    assert sorted(p.name for p in job.log_dir.iterdir()) == ["rank-0.log", "rank-1.log"]


def test_missing_model_exits_2_before_srun(finished_jobs) -> None:
    job, status = finished_jobs["missing-model"]
    assert status == 2, job.describe()
    missing = job.directory.parent / "no-such-model"
    expected = (
        f"MODEL={missing} is not a directory; download the checkpoint to shared storage first"
    )
    assert job.job_out.splitlines() == [expected], job.describe()
    assert not job.log_dir.exists() and not job.output.exists()


def test_scancel_aborts_the_requests_and_keeps_their_tokens(stopped_jobs) -> None:
    stopped = stopped_jobs["scancel"]
    job = stopped.job
    assert stopped.took_s < ENDS_WITHIN_S, f"{stopped.took_s:.0f} s\n{job.describe()}"
    responses = job.responses()
    assert len(responses) == len(PROMPTS), job.describe()
    for response in responses:
        assert response["finish_reason"] == "abort", response
        assert 0 < len(response["token_ids"]) < 1900, response
    log = (job.log_dir / "rank-0.log").read_text()
    assert f"aborting {len(PROMPTS)} unfinished request(s)" in log, log


def test_a_task_killed_with_sigkill_ends_the_job(stopped_jobs) -> None:
    stopped = stopped_jobs["kill"]
    job = stopped.job
    assert stopped.took_s < ENDS_WITHIN_S, f"{stopped.took_s:.0f} s\n{job.describe()}"
    assert stopped.status != 0, job.describe()
    assert "exit status: 0" not in job.job_out

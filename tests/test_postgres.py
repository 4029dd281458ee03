"""`selfspec tune` workers sharing one study on a real PostgreSQL server of the test's own: one worker is
killed mid-search, the other finishes, and a third run resumes the study, marks the dead worker's trial FAIL
and writes the best measured schedule."""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from click.testing import CliRunner
from selfspec.search.tune import GRACE_SECONDS, MIN_SPEEDUP, _lost_table_race
from test_tune import store_small_calibration, write_prompts

import selfspec
from selfspec.cli import main

SURVIVOR_TRIALS = 12
STATES = optuna.trial.TrialState
FINISHED = (STATES.COMPLETE, STATES.PRUNED)  # a pruned trial is finished too: scored on the early texts only


def _server_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 only, in a temporary folder, stopped and removed afterwards; yields
    the SQLAlchemy URL of its `postgres` database."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor under /usr/lib/postgresql")
    # initdb refuses to run as root: then the server runs as `nobody`, in a folder of its own under /tmp,
    # since pytest's tmp folders are private to root (and a unix socket path must stay under 108 bytes).
    as_root = os.geteuid() == 0
    user = pwd.getpwnam("nobody") if as_root else None
    ids = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
    home = Path(tempfile.mkdtemp(prefix="selfspec-pg-"))
    if user:
        os.chown(home, user.pw_uid, user.pw_gid)
    data, port = home / "data", _free_port()

    def server(*args: str) -> None:
        subprocess.run([*args], check=True, capture_output=True, cwd=home, timeout=120, **ids)

    try:
        server(str(bin_dir / "initdb"), "-D", str(data), "-U", "selfspec", "--auth=trust", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={home} -c fsync=off"
        server(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start")
        yield f"postgresql+psycopg2://selfspec@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            server(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home)


def _trials(storage: optuna.storages.RDBStorage, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _of(trials: list[optuna.trial.FrozenTrial], worker: subprocess.Popen, *states: STATES) -> set[int]:
    """Numbers of the trials in one of `states` that the worker process made."""
    name = f"{socket.gethostname()}:{worker.pid}"
    return {t.number for t in trials if t.state in states and t.user_attrs.get("worker") == name}


def _kill_mid_trial(worker: subprocess.Popen, storage: optuna.storages.RDBStorage, study: str, after: int) -> None:
    """SIGKILL the worker once it has finished `after` trials and is inside one more.

    It is stopped (SIGSTOP) before the check, so the trial seen running is still running when it dies.
    """
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before it could be killed"
        trials = _trials(storage, study)
        if len(_of(trials, worker, *FINISHED)) >= after and _of(trials, worker, STATES.RUNNING):
            worker.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # a write already sent lands on the server meanwhile
            if _of(_trials(storage, study), worker, STATES.RUNNING):
                worker.kill()
                worker.wait()
                return
            worker.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError(f"the worker did not reach {after} trials in time")


@pytest.mark.slow
def test_workers_on_postgres_survive_a_killed_worker(postgres, smollm2_fp32, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    study = "shared"
    store_small_calibration(smollm2_fp32, prompts, postgres, study)

    run = [sys.executable, "-m", "selfspec", "tune", "smollm2-135m", "--dtype", "float32", "--threads", "1"]
    run += ["--prompts", str(prompts), "--storage", postgres, "--study", study]
    search = ["--finalists", "0", "--timeout", "600"]
    storage = optuna.storages.RDBStorage(postgres)  # the test's own view of the study, one connection pool
    with (tmp_path / "victim.log").open("w") as victim_log, (tmp_path / "survivor.log").open("w") as survivor_log:
        victim = subprocess.Popen(
            [*run, *search, "--trials", "1000", "--seed", "1"], stdout=victim_log, stderr=subprocess.STDOUT
        )
        survivor = subprocess.Popen(
            [*run, *search, "--trials", str(SURVIVOR_TRIALS), "--seed", "2"],
            stdout=survivor_log,
            stderr=subprocess.STDOUT,
        )
        try:
            _kill_mid_trial(victim, storage, study, after=3)
            killed_at = time.monotonic()
            trials = _trials(storage, study)
            victim_done, (victim_running,) = _of(trials, victim, *FINISHED), _of(trials, victim, STATES.RUNNING)
            assert survivor.wait(timeout=240) == 0, (tmp_path / "survivor.log").read_text()
        finally:
            for worker in (victim, survivor):
                worker.kill()
                worker.wait()
    before_resume = {t.number: t.state for t in _trials(storage, study)}
    print(f"killed worker: {len(victim_done)} trials complete, trial {victim_running} running at the kill; ")
    print(f"after the survivor: trial {victim_running} is {before_resume[victim_running].name}")

    # the dead worker's trial is marked FAIL by the first run to open the study once its heartbeat is stale
    time.sleep(max(0.0, killed_at + GRACE_SECONDS + 1 - time.monotonic()))
    out = tmp_path / "final.schedule.json"
    final = subprocess.run(
        [*run, "--trials", "0", "--finalists", "2", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stdout + final.stderr

    trials = _trials(storage, study)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = {t.number for t in trials if t.state in FINISHED}
    complete = {t.number for t in trials if t.state == STATES.COMPLETE}
    assert victim_done <= finished  # every trial the killed worker finished is kept
    assert len(_of(trials, survivor, *FINISHED)) == SURVIVOR_TRIALS
    assert len(finished) == 1 + len(victim_done) + SURVIVOR_TRIALS  # the setup's, the victim's, the survivor's
    assert {t.number: t.state for t in trials if t.state not in FINISHED} == {victim_running: STATES.FAIL}

    schedule = selfspec.Schedule.from_file(out)
    meta = schedule.meta
    assert meta["study"] == study and meta["trials"] == len(complete)
    best = max(meta["finalists"], key=lambda f: f["tokens_per_second"])
    if best["tokens_per_second"] / meta["plain_tokens_per_second"] >= MIN_SPEEDUP:
        assert meta["tokens_per_second"] == best["tokens_per_second"]
        written = {k: v for k, v in schedule.to_dict().items() if k not in ("format", "meta")}
        assert written == best["schedule"]
    else:
        assert not schedule.drafting and meta["speedup"] == 1.0


@pytest.mark.parametrize("url", ["postgresql://u@127.0.0.1:1/db", "postgresql+psycopg2://u@127.0.0.1:1/db"])
def test_a_missing_driver_is_one_line_naming_the_extra(url, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # `import psycopg2` now fails, as where it is not installed
    result = CliRunner().invoke(main, ["tune", "smollm2-135m", "--storage", url, "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2
    assert result.stderr == "error: the PostgreSQL driver is missing; pip install 'selfspec[postgres]'\n"


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path):
    url = f"postgresql+psycopg2://u:secret@127.0.0.1:{_free_port()}/db"
    result = CliRunner().invoke(main, ["tune", "smollm2-135m", "--storage", url, "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot open --storage postgresql+psycopg2://u:***@127.0.0.1:")
    assert result.stderr.count("\n") == 1 and "secret" not in result.stderr


def test_workers_starting_together_on_a_new_database_all_open_it(postgres):
    # they race to create the study tables; before the retry, one of three often failed
    code = f"from selfspec.search.tune import open_storage; open_storage({postgres!r})"
    workers = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for worker in workers:
        _, errors = worker.communicate(timeout=120)
        assert worker.returncode == 0, errors


def test_a_table_another_worker_created_first_counts_as_the_race(postgres):
    # the CREATE TABLE that comes second fails as the table's (42P07), not as its catalogue row's (23505)
    engine = sqlalchemy.create_engine(postgres)
    create = sqlalchemy.text("CREATE TABLE made_by_another_worker (id integer)")
    with engine.begin() as connection:
        connection.execute(create)
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as second, engine.begin() as connection:
        connection.execute(create)
    assert _lost_table_race(second.value)
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as other, engine.begin() as connection:
        connection.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
    assert not _lost_table_race(other.value)
    engine.dispose()

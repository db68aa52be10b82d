"""Slurm -> torch variable mapping, launcher gaps, and a bounded collective timeout."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from vltrain.engine.distributed import (DistInfo, expand_nodelist, first_host, parse_tasks_per_node,
                                        port_from_job_id, setup_env, setup_env_from_slurm)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def srun_task_env(**over):
    """What srun gives task 3 of `srun --nodes=3 --ntasks-per-node=2`."""
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "6", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "node[1-3]",
           "SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "PATH": "/usr/bin:/bin"}
    env.update(over)
    env.setdefault("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])    # an srun task has its step's
    return env


def test_srun_task_maps_to_torch_variables():
    env = srun_task_env()
    info = setup_env(env, use_scontrol=False)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "6")
    assert (env["LOCAL_WORLD_SIZE"], env["LOCAL_SIZE"]) == ("2", "2")
    assert (env["NODE_RANK"], env["GROUP_RANK"]) == ("1", "1")
    assert env["MASTER_ADDR"] == "node1"
    assert env["MASTER_PORT"] == str(10000 + 12345 % 20000)
    assert info == DistInfo(rank=3, world=6, local_rank=1, local_world=2, node_rank=1)
    assert not info.is_main and info.num_nodes == 3


def test_uneven_tasks_per_node_are_refused():
    """Streaming derives nodes as world / ranks per node: uneven nodes would make ranks disagree
    on the data partition, so such a layout is refused with the sbatch option to use."""
    env = srun_task_env(SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NTASKS="5", SLURM_NODEID="2",
                        SLURM_TASKS_PER_NODE="2(x2),1", SLURM_JOB_NODELIST="gpu[07-09]")
    del env["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(ValueError, match=r"uneven \(2\(x2\),1\).*--ntasks-per-node"):
        setup_env(env, use_scontrol=False)
    env = srun_task_env(SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NTASKS="6", SLURM_NODEID="2",
                        SLURM_TASKS_PER_NODE="2(x3)", SLURM_JOB_NODELIST="gpu[07-09]")
    del env["SLURM_NTASKS_PER_NODE"]
    setup_env(env, use_scontrol=False)
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["RANK"] == "4" and env["MASTER_ADDR"] == "gpu07"


def test_a_batch_script_is_not_a_rank():
    """The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step: mapping them
    would wait for peers that never start. Refused naming srun; alone in its job, one process."""
    env = srun_task_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    for k in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        del env[k]
    with pytest.raises(RuntimeError, match=r"Slurm job 12345 of SLURM_NTASKS=6 tasks but is not one of them.*"
                                           r"`srun python vltrain/run.py \.\.\.`.*RANK=0 WORLD_SIZE=1"):
        setup_env(dict(env), use_scontrol=False)
    for ntasks in ("1", None):
        one = dict(env, SLURM_NTASKS=ntasks) if ntasks else {k: v for k, v in env.items() if k != "SLURM_NTASKS"}
        info = setup_env(one, use_scontrol=False)
        assert (info.rank, info.world, one["MASTER_ADDR"]) == (0, 1, "127.0.0.1")
    alone = dict(env, RANK="0", WORLD_SIZE="1")                        # the message's way out
    assert setup_env(alone, use_scontrol=False).world == 1


def test_step_variables_win_over_job_variables():
    env = srun_task_env(SLURM_STEP_NODELIST="node[2-3]", SLURM_STEP_NUM_TASKS="4", SLURM_STEP_TASKS_PER_NODE="2(x2)")
    setup_env_from_slurm(env, use_scontrol=False)
    assert env["MASTER_ADDR"] == "node2" and env["WORLD_SIZE"] == "4"
    # a step of 1 task per node in a job of 2 per node (an eval beside training): the step's layout
    env = srun_task_env(SLURM_STEP_NODELIST="node[2-3]", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
                        SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1")
    setup_env_from_slurm(env, use_scontrol=False)
    assert (env["LOCAL_WORLD_SIZE"], env["RANK"], env["NODE_RANK"]) == ("1", "1", "1")


@pytest.mark.parametrize("text, want", [("2(x3)", [2, 2, 2]), ("4", [4]), ("2(x2),1", [2, 2, 1]),
                                        ("1,3(x2),2", [1, 3, 3, 2])])
def test_parse_tasks_per_node(text, want):
    assert parse_tasks_per_node(text) == want


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError):
        parse_tasks_per_node("two")


@pytest.mark.parametrize("nodelist, want", [
    ("node[1-2]", ["node1", "node2"]),
    ("node1", ["node1"]),
    ("n1,n2", ["n1", "n2"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("a-[008-010]-ib", ["a-008-ib", "a-009-ib", "a-010-ib"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_nodelist(nodelist, want):
    assert expand_nodelist(nodelist) == want
    assert first_host(nodelist, use_scontrol=False) == want[0]


def test_first_host_asks_scontrol_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"   # an outside tool: prints what `scontrol show hostnames` prints
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'alpha\\nbeta\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert first_host("whatever[1-2]") == "alpha"
    assert first_host("whatever[1-2]", use_scontrol=False) == "whatever1"


def test_existing_variables_are_not_touched():
    # a launcher already set the torch variables: no Slurm mapping at all
    env = srun_task_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000")
    assert setup_env_from_slurm(env, use_scontrol=False) is False
    setup_env(env, use_scontrol=False)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("0", "2", "10.0.0.1", "6000")
    # RANK absent but the user fixed the rendezvous: those are kept
    env = srun_task_env(MASTER_ADDR="head", MASTER_PORT="7777", LOCAL_WORLD_SIZE="2")
    setup_env(env, use_scontrol=False)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("head", "7777", "3")


def test_deepspeed_launcher_gets_local_world_size():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2"}
    info = setup_env(env, use_scontrol=False)
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["NODE_RANK"] == "1"
    assert info.local_world == 2 and info.node_rank == 1


def test_torchrun_gets_local_size():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    setup_env(env, use_scontrol=False)
    assert env["LOCAL_SIZE"] == "4" and env["NODE_RANK"] == "1"


def test_bare_python_is_a_one_process_world():
    env = {"PATH": "/usr/bin"}
    info = setup_env(env, use_scontrol=False)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("0", "1", "0", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    assert info.is_main and info.world == 1


def test_port_from_job_id():
    assert port_from_job_id("12345") == 22345 and port_from_job_id("30000") == 20000
    assert 10000 <= port_from_job_id("1234_7") < 30000      # array-job style ids still give a port
    # steps of one allocation running at once (srun twice in one salloc) each get their own;
    # step 0 and the batch step keep the job's (the templates' default)
    ports = {port_from_job_id("4242", str(s)) for s in range(200)}
    assert len(ports) == 200 and port_from_job_id("4242", "0") == port_from_job_id("4242") == 14242
    assert port_from_job_id("4242", "4294967294") == 14242
    env = srun_task_env(SLURM_STEP_ID="1")
    setup_env(env, use_scontrol=False)
    assert env["MASTER_PORT"] == str(port_from_job_id("12345", "1")) != str(port_from_job_id("12345"))


def test_a_cyclic_task_layout_is_refused():
    """`srun -m cyclic` (or an inherited SLURM_DISTRIBUTION) deals tasks round-robin over the
    nodes: streaming would take ranks 0-1 for node 0's and put both local leaders on one host.
    Refused, naming -m block; the block layout of the same task passes."""
    env = srun_task_env(SLURM_PROCID="3", SLURM_NODEID="0", SLURM_LOCALID="1", SLURM_DISTRIBUTION="cyclic")
    with pytest.raises(ValueError, match=r"task 3 as task 1 of node 0.*task 1 of node 1.*--distribution=block"):
        setup_env(env, use_scontrol=False)
    assert setup_env(srun_task_env(), use_scontrol=False).node_rank == 1


# ---------------------------------------------------------------------------- real processes

RANK_SCRIPT = textwrap.dedent(r"""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from vltrain.engine.distributed import init_distributed
    info = init_distributed(timeout_s=float(sys.argv[1]))
    print(f"INFO rank={info.rank} world={info.world} local_world={info.local_world} "
          f"backend={info.backend} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    t = torch.ones(1)
    torch.distributed.all_reduce(t)                      # both ranks: works
    print(f"SUM {t.item()}", flush=True)
    if info.rank == 1:
        time.sleep(float(sys.argv[2]))                   # rank 1 hangs: never joins the next collective
        sys.exit(0)
    t0 = time.time()
    try:
        torch.distributed.all_reduce(t)
        print("NO-TIMEOUT", flush=True)
    except Exception as e:
        print(f"TIMEOUT after {time.time() - t0:.1f}s: {type(e).__name__}", flush=True)
        os._exit(3)
""")


def _port_for_job():
    for job in range(4242, 20000, 97):     # MASTER_PORT = 10000 + job: find a free one
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job))
                return job
            except OSError:
                continue
    pytest.skip("no free port in 10000-30000")


def test_two_srun_tasks_rendezvous_and_a_hung_peer_times_out():
    """Two processes with only SLURM_* variables form a gloo world; rank 1 then hangs and
    rank 0's collective fails after the configured timeout instead of hanging."""
    job = _port_for_job()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                                        "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job))
    timeout_s, hang_s = 4.0, 40
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(timeout_s), str(hang_s)], cwd=ROOT,
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        t0 = time.time()
        out0, _ = procs[0].communicate(timeout=300)   # a first DeepSpeed run JIT-builds its shm op
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        out1 = procs[1].communicate()[0]
    assert f"master=localhost:{10000 + job}" in out0, out0[-3000:]
    assert "INFO rank=0 world=2 local_world=2 backend=gloo" in out0 and "SUM 2.0" in out0, out0[-3000:]
    assert "INFO rank=1 world=2" in out1, out1[-3000:]
    assert "TIMEOUT after" in out0 and procs[0].returncode == 3, out0[-3000:]
    waited = float(out0.split("TIMEOUT after ")[1].split("s")[0])
    assert timeout_s - 0.5 <= waited < timeout_s + 15, out0
    assert elapsed < hang_s                      # rank 0 did not wait for the hung peer


def _common_sh(script: str, **env) -> subprocess.CompletedProcess:
    """``script`` run by bash after sourcing slurm/common.sh (its helper functions)."""
    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "-c", f"source slurm/common.sh; {script}"], capture_output=True, text=True,
                          env=full, timeout=60)


def test_sbatch_helpers_refuse_uneven_layouts_and_see_checkpoints(tmp_path):
    """The batch shell refuses "4(x2),2" before srun (exit 2, the option to use); a requeued
    run resumes its own checkpoints only once it has a complete one (else the user's
    train.resume applies)."""
    p = _common_sh("vltrain_check_even_tasks", SLURM_TASKS_PER_NODE="4(x2),2")
    assert p.returncode == 2 and "uneven (4(x2),2)" in p.stderr and "--ntasks-per-node" in p.stderr
    assert _common_sh("vltrain_check_even_tasks", SLURM_TASKS_PER_NODE="4(x3)").returncode == 0
    # --nodes=2 --ntasks=3 --ntasks-per-node=2: Slurm says "2(x2)", srun would start 2 + 1
    p = _common_sh("vltrain_check_even_tasks", SLURM_TASKS_PER_NODE="2(x2)", SLURM_NTASKS="3")
    assert p.returncode == 2 and "--ntasks=3 does not fill the job's nodes evenly" in p.stderr, p.stderr
    assert "(tasks per node: 2(x2), 4 in all)" in p.stderr, p.stderr
    for tpn, n in (("2(x2)", "4"), ("8", "8"), ("3(x2),3", "9")):
        assert _common_sh("vltrain_check_even_tasks", SLURM_TASKS_PER_NODE=tpn, SLURM_NTASKS=n).returncode == 0
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010.partial-x").mkdir(parents=True)   # being written: not complete
    assert _common_sh(f"vltrain_has_checkpoint {run}").returncode == 1
    (run / "checkpoints" / "step_00000005").mkdir()
    (run / "checkpoints" / "step_00000005" / "vltrain_ckpt.json").write_text("{}")
    assert _common_sh(f"vltrain_has_checkpoint {run}").returncode == 0
    # [ ] * ? in the run folder's path are characters, not a pattern (the config refuses them in
    # run_name and output_root, for DeepSpeed's sake; the shell does not rely on that)
    odd = tmp_path / "vqa[lr5e-5] *"
    shutil.copytree(run, odd)
    assert _common_sh(f"vltrain_has_checkpoint '{odd}'").returncode == 0
    assert _common_sh(f"vltrain_has_checkpoint '{tmp_path}/vqa[lr5e-6] *'").returncode == 1


def test_sbatch_helpers_read_the_job_as_slurm_started_it(tmp_path):
    """Tasks per node as started, not as asked (`sbatch --ntasks=4` of the 8-per-node template
    split the CPUs 8 ways); scontrol fields whose value holds spaces (a checkout or a job name
    with one: grep -o 'StdOut=[^ ]*' cut them short); %a / %A in an array task's overrides."""
    p = _common_sh("vltrain_tasks_per_node", SLURM_TASKS_PER_NODE="4", SLURM_NTASKS_PER_NODE="8")
    assert p.stdout.strip() == "4", (p.stdout, p.stderr)
    line = ("JobId=5 JobName=my run Command=/shared/my code/vltrain/slurm/pretrain.sbatch WorkDir=/shared/my code "
            "StdIn=/dev/null StdOut=/shared/out dir/my run-5.out Power= CPUs/Task=4")
    for field, want in (("Command", "/shared/my code/vltrain/slurm/pretrain.sbatch"),
                        ("StdOut", "/shared/out dir/my run-5.out")):
        p = _common_sh(f"vltrain_job_field {field} <<<'{line}'")
        assert p.stdout == want + "\n", (field, p.stdout)
    p = _common_sh("vltrain_job_field NodeAddr <<<'NodeName=gpu001 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=gpu001'")
    assert p.stdout.strip() == "10.1.2.3"
    script = "vltrain_array_fields 'run_name=sweep_%A_%a'; echo; vltrain_array_fields train.seed=%a"
    p = _common_sh(script, SLURM_JOB_ID="124", SLURM_ARRAY_JOB_ID="120", SLURM_ARRAY_TASK_ID="4")
    assert p.stdout.split() == ["run_name=sweep_120_4", "train.seed=4"], p.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    p = subprocess.run(["bash", "-c", "source slurm/common.sh; vltrain_array_fields train.seed=%a"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout == "train.seed=%a"                                    # not an array: as typed


def test_a_rank_that_does_not_see_the_run_folder_stops(tmp_path):
    """A node-local OUTPUT_ROOT (/tmp on the submit node): the batch node made the run folder,
    the other nodes' ranks would write checkpoints nobody reads. Their task refuses to start
    (after waiting out an NFS cache, VLTRAIN_SHARED_WAIT_S), naming the folder."""
    missing = tmp_path / "runs" / "r" / "logs" / ".exit" / "7.0"
    p = _common_sh(f"vltrain_task '{missing}' echo should-not-run", VLTRAIN_SHARED_WAIT_S="1", SLURM_PROCID="3")
    assert p.returncode == 2 and "should-not-run" not in p.stdout, (p.stdout, p.stderr)
    assert f"rank 3 on {socket.gethostname().split('.')[0]}: the run folder {tmp_path / 'runs' / 'r'} is not there" \
        in p.stderr and "every node sees" in p.stderr, p.stderr
    missing.mkdir(parents=True)
    p = _common_sh(f"vltrain_task '{missing}' echo ran", SLURM_PROCID="3")
    assert p.returncode == 0 and "ran" in p.stdout and (missing / "3").read_text().strip() == "0"


def test_sbatch_cpus_per_task_fit_the_smallest_node():
    """srun --cpus-per-task x ranks per node must fit on every node: a job given 128 and 64 CPUs
    asked for 16 per rank (the batch node's 128 / 8) and failed to start its step."""
    for spec, want in (("128(x3),64", "64"), ("64,128", "64"), ("96(x2)", "96")):
        p = _common_sh("vltrain_min_cpus_per_node", SLURM_JOB_CPUS_PER_NODE=spec)
        assert p.returncode == 0 and p.stdout.strip() == want, (spec, p.stdout, p.stderr)


def test_sbatch_rendezvous_port_moves_past_a_taken_one():
    """The job-id port can be taken on the first node (a service; a job whose id differs by a
    multiple of 20000): the batch shell takes the next free one instead of failing the job."""
    probe = f'vltrain_free_port "{sys.executable}" '
    port = int(_common_sh(probe + str(20000 + os.getpid() % 5000)).stdout)      # one free now
    with socket.socket() as held:
        held.bind(("", port))
        held.listen()
        p = _common_sh(probe + str(port))
        assert p.returncode == 0 and int(p.stdout) > port, (p.stdout, p.stderr)
    assert int(_common_sh(probe + str(port)).stdout) == port                   # released: that one again


def test_sbatch_job_array_tasks_get_their_own_run_folder():
    """A job array's tasks shared RUN_NAME's folder (checkpoints overwritten, resumed across
    tasks): %a becomes the task id, and an array without it is refused before anything runs."""
    p = _common_sh('vltrain_array_run_name && vltrain_array_fields "run_name=$RUN_NAME"', SLURM_ARRAY_TASK_ID="3",
                   RUN_NAME="sweep_%a")
    assert p.returncode == 0 and p.stdout.strip() == "run_name=sweep_3", (p.stdout, p.stderr)
    p = _common_sh("vltrain_array_run_name", SLURM_ARRAY_TASK_ID="3", RUN_NAME="sweep")
    assert p.returncode == 2 and "set RUN_NAME with %a" in p.stderr, (p.stdout, p.stderr)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    p = subprocess.run(["bash", "-c", 'source slurm/common.sh; vltrain_array_run_name; echo "RUN_NAME=$RUN_NAME"'],
                       capture_output=True, text=True, env={**env, "RUN_NAME": "plain"}, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "RUN_NAME=plain"


def test_sbatch_array_task_requeues_itself_not_the_array():
    """The first task of an array has SLURM_JOB_ID == SLURM_ARRAY_JOB_ID, and `scontrol requeue`
    of that id requeues every task of the array: the task is named <array>_<task>."""
    p = _common_sh("vltrain_job_ref", SLURM_JOB_ID="36", SLURM_ARRAY_JOB_ID="36", SLURM_ARRAY_TASK_ID="1")
    assert p.stdout.strip() == "36_1", (p.stdout, p.stderr)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    p = subprocess.run(["bash", "-c", "source slurm/common.sh; vltrain_job_ref"], capture_output=True, text=True,
                       env={**env, "SLURM_JOB_ID": "41"}, timeout=60)
    assert p.stdout.strip() == "41", (p.stdout, p.stderr)


def test_sbatch_refuses_more_ranks_per_node_than_gpus_and_heterogeneous_jobs():
    """--gpus-per-node=4 with the templates' default 8 tasks per node left ranks 4-7 without a
    GPU (an error about device indices from them); a heterogeneous job would train on its first
    component only. Both are refused before srun, naming the fix."""
    p = _common_sh("vltrain_check_gpus_per_node 8", SLURM_GPUS_ON_NODE="4")
    assert p.returncode == 2 and "8 tasks per node but 4 GPUs per node" in p.stderr, p.stderr
    assert "--ntasks-per-node=4" in p.stderr
    for gpus, tasks in (("4", "4"), ("8", "4"), ("0", "2")):     # fewer ranks than GPUs, or CPU nodes: fine
        assert _common_sh(f"vltrain_check_gpus_per_node {tasks}", SLURM_GPUS_ON_NODE=gpus).returncode == 0
    p = _common_sh("vltrain_main", SLURM_JOB_ID="7", SLURM_HET_SIZE="2")
    assert p.returncode == 2 and "heterogeneous job (2 components): not supported" in p.stderr, p.stderr


def test_sbatch_wait_keeps_the_childs_exit_code_when_a_signal_comes_as_it_ends():
    """The batch shell and each task wait for their child with USR1/TERM trapped. A signal that
    arrived as the child ended cut a blocking `wait` short and lost the child's status in bash
    (read 138: a finished run reported FAILED); measured 3 in 20 with the blocking loop."""
    script = ('trap "true" USR1; for i in $(seq 12); do ( kill -USR1 $$; exit 75 ) & '
              'vltrain_wait $!; echo "rc=$vltrain_rc"; done')
    p = _common_sh(script)
    assert p.returncode == 0 and p.stdout.split() == ["rc=75"] * 12, (p.stdout, p.stderr)


def test_sbatch_wait_does_not_report_its_sleep_killed_by_the_steps_signal():
    """Slurm signals every process of the step, the wait loop's sleep too: bash printed "User
    defined signal 1" for it, which reads like a crash in the rank's log."""
    script = ("trap 'true' USR1 TERM; (trap '' USR1 TERM; sleep 3; exit 4) & c=$!; "  # the child takes them
              "(trap '' USR1 TERM; sleep 0.5; kill -USR1 -- -$$; sleep 0.5; kill -TERM -- -$$) & "
              'vltrain_wait $c; echo "rc=$vltrain_rc"')
    p = subprocess.run(["setsid", "bash", "-c", f"source slurm/common.sh; {script}"], capture_output=True,
                       text=True, timeout=60)
    assert p.stdout.split() == ["rc=4"] and "signal" not in p.stderr and "Terminated" not in p.stderr, p


def test_a_batch_script_whose_python_lacks_the_stack_stops_before_srun(tmp_path):
    """`sbatch --export=CONFIG=...` without ALL: the job has no PATH to the venv, so `python` is
    the system's. Named before srun, with the fix; the ranks used to die on `import torch`."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\nexec {shutil.which('python3') or '/usr/bin/python3'} -S \"$@\"\n")
    fake.chmod(0o755)
    p = _common_sh("vltrain_main", SLURM_JOB_ID="7", PYTHON=str(fake), CONFIG="configs/debug.yaml",
                   VLTRAIN_HOME=os.getcwd())
    assert p.returncode == 2 and "cannot import torch, deepspeed, streaming, yaml" in p.stderr, p.stderr
    assert "--export=ALL,CONFIG=" in p.stderr, p.stderr


def test_sbatch_refuses_a_time_limit_within_the_usr1_lead():
    """--time=3 with the templates' USR1@300: Slurm signals at once, and every requeued run
    checkpointed after its first step, 20 times over, with nothing in the logs saying why."""
    seconds = {"3:00": "180", "05:00": "300", "48:00:00": "172800", "1-00:00:00": "86400", "2-03:04:05": "183845",
               "UNLIMITED": "", "NOT_SET": ""}
    for text, want in seconds.items():
        assert _common_sh(f"vltrain_seconds '{text}'").stdout.strip() == want, text
    p = _common_sh("vltrain_check_time_limit 3:00", SLURM_JOB_ID="7")
    assert p.returncode == 2 and "time limit (3:00) is not above the USR1 lead (300 s" in p.stderr, p.stderr
    assert "--time" in p.stderr
    for limit, env in (("5:01", {}), ("UNLIMITED", {}), ("3:00", {"VLTRAIN_SIGNAL_LEAD_S": "60"})):
        assert _common_sh(f"vltrain_check_time_limit {limit}", **env).returncode == 0, (limit, env)


def test_the_batch_log_quotes_each_ranks_error_of_its_last_run(tmp_path):
    """Logged errors, else an uncaught exception's last traceback line (it has no ERROR line:
    the batch log said only "training failed"); a requeued run's earlier errors are left out."""
    start = "2026-12-06 10:00:00 job=9 rank=0 node=n1: starting vltrain/run.py\n"
    uncaught = 'Traceback (most recent call last):\n  File "run.py"\nModuleNotFoundError: No module named \'torch\'\n'
    (tmp_path / "9-0.log").write_text(start + "x ERROR old\n" + start + uncaught)
    (tmp_path / "9-1.log").write_text(start + "2026 job=9 rank=1 ERROR vltrain.run: DataError: data.train: gone\n"
                                      "ValueError: not this one\n")
    p = _common_sh(f"vltrain_rank_errors {tmp_path} 9")
    assert p.stdout.splitlines() == ["ModuleNotFoundError: No module named 'torch'",
                                     "ERROR vltrain.run: DataError: data.train: gone [rank 1]"], p.stdout
    # one error of every rank (a config refused alike) is one line, naming the ranks; another's stays
    for r in (2, 3, 10, 11, 100):
        (tmp_path / f"9-{r}.log").write_text(start + f"2026 job=9 rank={r} ERROR vltrain.run: ValueError: lr\n")
    (tmp_path / "9-4.log").write_text(start + "2026 job=9 rank=4 ERROR vltrain.run: ValueError: lr\n"
                                      "2026 job=9 rank=4 worker=1 ERROR vltrain.run: ValueError: lr\n")   # one rank
    p = _common_sh(f"vltrain_rank_errors {tmp_path} 9")
    assert p.stdout.splitlines() == ["ModuleNotFoundError: No module named 'torch'",
                                     "ERROR vltrain.run: DataError: data.train: gone [rank 1]",
                                     "ERROR vltrain.run: ValueError: lr [ranks 2,3,4 and 3 more]"], p.stdout


def test_a_rank_that_sees_fewer_gpus_than_its_local_rank_is_told_why():
    """cuda:LOCAL_RANK needs every GPU of the node visible; per-task GPU binding hid them and
    CUDA said only "invalid device ordinal"."""
    from vltrain.engine.distributed import check_visible_gpus
    check_visible_gpus(7, 8, {})
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=3 but this rank sees 1 GPU\(s\) "
                                           r"\(CUDA_VISIBLE_DEVICES=5\).*srun --gpu-bind=none"):
        check_visible_gpus(3, 1, {"CUDA_VISIBLE_DEVICES": "5"})


def test_sbatch_task_picks_the_cpu_accelerator_only_without_allocated_gpus(tmp_path):
    """No nvidia-smi on PATH: the CPU accelerator, unless Slurm allocated GPUs on the node
    (a container without nvidia-smi, a ROCm node), where DeepSpeed detects the device itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DS_ACCELERATOR"))}
    env["PATH"] = "/usr/bin:/bin"                                       # no nvidia-smi here
    assert not shutil.which("nvidia-smi", path=env["PATH"])
    show = 'vltrain_task "$EXIT" bash -c \'echo "acc=${DS_ACCELERATOR:-auto}"\''
    for extra, want in (({}, "acc=cpu"), ({"SLURM_GPUS_ON_NODE": "8"}, "acc=auto"),
                        ({"SLURM_STEP_GPUS": "0,1"}, "acc=auto")):
        p = subprocess.run(["bash", "-c", f"source slurm/common.sh; {show}"], capture_output=True, text=True,
                           env={**env, **extra, "EXIT": str(tmp_path)}, timeout=60)
        assert p.returncode == 0 and want in p.stdout, (extra, p.stdout, p.stderr)


def test_a_rank_on_allocated_gpus_that_torch_cannot_see_stops_instead_of_taking_gloo(monkeypatch):
    """A GPU node whose CUDA is broken (CPU-only torch, old driver) took the CPU accelerator and
    gloo beside its peers' NCCL: a hang until the rendezvous timeout. Where Slurm allocated GPUs
    (this machine has none) it stops naming them; without an allocation it is a CPU rank."""
    import torch
    from vltrain.engine.distributed import pick_backend
    assert not torch.cuda.is_available()
    for k in ("DS_ACCELERATOR", "SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    for given in ({"SLURM_GPUS_ON_NODE": "4"}, {"SLURM_STEP_GPUS": "0,1"}, {"SLURM_JOB_GPUS": "0"}):
        with monkeypatch.context() as m:
            for k, v in given.items():
                m.setenv(k, v)
            with pytest.raises(RuntimeError, match=rf"Slurm allocated GPUs to this task \({k}={v}\) but torch sees "
                                                   r"none .*set DS_ACCELERATOR=cpu"):
                pick_backend()
            assert "DS_ACCELERATOR" not in os.environ
    with monkeypatch.context() as m:             # a CPU step of a GPU job: the job's GPUs are not its own
        m.setenv("SLURM_JOB_GPUS", "0,1")
        m.setenv("SLURM_STEP_ID", "3")
        assert pick_backend() == ("cpu", "gloo")
    del os.environ["DS_ACCELERATOR"]            # set by pick_backend (the outer monkeypatch restores it)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")           # a count
    assert pick_backend() == ("cpu", "gloo") and os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("SLURM_STEP_GPUS", "0")              # GPU 0, but DS_ACCELERATOR=cpu is the user's choice
    assert pick_backend() == ("cpu", "gloo")


@pytest.mark.parametrize("leftover", [{"RANK": "3"}, {"WORLD_SIZE": "8"}])
def test_half_a_launcher_environment_is_refused(leftover):
    env = srun_task_env(**leftover)
    with pytest.raises(ValueError, match="is set but (WORLD_SIZE|RANK) is not: set both"):
        setup_env(env, use_scontrol=False)


def test_free_ports_are_outside_the_ephemeral_range_and_distinct():
    """A port handed to a process that binds it seconds later must not be one the kernel may
    give an outgoing connection meanwhile (its ephemeral range), nor one given before."""
    from vltrain.engine.distributed import _ephemeral_start, free_port
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(15000 <= p < _ephemeral_start() for p in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_taken_master_port_is_named_with_the_fix(tmp_path):
    """Two jobs on one machine started with the launcher's default port: the second's rank 0
    cannot listen there. It stops with a message naming the port and how to pick another
    (torch's own was a DistNetworkError traceback), before making anything."""
    from tests.fixtures.corpus import rank_env
    from vltrain.engine.distributed import free_port
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "vltrain/run.py", "--config", "configs/debug.yaml",
                            f"output_root={tmp_path}"], cwd=ROOT, env=rank_env(0, 1, port),
                           capture_output=True, text=True, timeout=300)
    finally:
        taken.close()
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"ValueError: MASTER_PORT={port} on 127.0.0.1 is taken (another job on this machine, launched with "
            "the same default port?): start this one on another port (deepspeed --master_port N") in r.stderr
    assert "Traceback" not in r.stderr and not os.listdir(tmp_path)


def _slow_main_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks whose process group waits 3 s; rank 0's read takes 6 s, then an
    error of rank 0's own."""
    import json
    from datetime import timedelta
    import torch.distributed as dist
    from vltrain.engine.distributed import from_main_rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=3))
    got = from_main_rank(lambda: (time.sleep(6), {"samples": 42})[1], long_wait=True)
    try:
        from_main_rank(lambda: int("index.json"))
        error = None
    except ValueError as e:
        error = str(e)
    with open(out, "w") as f:
        json.dump({"got": got, "error": error}, f)
    dist.destroy_process_group()


def test_ranks_wait_for_the_main_ranks_read_past_the_groups_timeout():
    """Rank 0 reads (a dataset's index, a checkpoint to consolidate, SCST references from every
    shard) while the others wait: past train.dist_timeout_s, which bounds collectives of ranks
    all at work; its error reaches every rank."""
    from tests.fixtures.corpus import fork_ranks
    from vltrain.engine.distributed import free_port
    res = fork_ranks(_slow_main_rank, 2, free_port(), timeout=60)
    assert res[0] == res[1] and res[0]["got"] == {"samples": 42}, res
    assert "invalid literal for int() with base 10: 'index.json'" in res[1]["error"], res

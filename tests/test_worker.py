"""The worker agent: staging, outputs, and whole assignments against a real rexd."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rexcore.artifacts.digest import Digest, digest_of
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.protocol.client import RexClient
from rexcore.sandbox.interface import SandboxRequest
from rexcore.sandbox.process import ProcessSandbox, ProcessSandboxOptions
from rexcore.serialization.action import (
    Action,
    Command,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    Tree,
    canonical_bytes,
)
from rexcore.serialization.codec import decode
from rexcore.serialization.sandbox_spec import SandboxSpec
from rexcore.serialization.worker_protocol import Assignment
from rexcore.testing import start_rexd
from rexcore.worker.agent import WorkerAgent
from rexcore.worker.errors import InputError, OutputError
from rexcore.worker.outputs import collect_outputs
from rexcore.worker.staging import InputStager
from tests.conftest import run_rexd

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and shells")
AS_ROOT = os.name == "posix" and os.geteuid() == 0


class Exe(bytes):
    """File content that is staged executable."""


def blob_tree(spec: dict, blobs: dict[Digest, bytes]) -> Digest:
    """A Directory tree from ``{"name": bytes | Exe | dict | ("symlink", target)}``;
    every blob goes into ``blobs``; the root's digest."""
    files, directories, symlinks = [], [], []
    for name in sorted(spec):
        value = spec[name]
        if isinstance(value, dict):
            directories.append(DirectoryNode(name, blob_tree(value, blobs)))
        elif isinstance(value, tuple):
            symlinks.append(SymlinkNode(name, value[1]))
        else:
            digest = digest_of(bytes(value))
            blobs[digest] = bytes(value)
            files.append(FileNode(name, digest, isinstance(value, Exe)))
    data = canonical_bytes(Directory(tuple(files), tuple(directories), tuple(symlinks)))
    digest = digest_of(data)
    blobs[digest] = data
    return digest


async def put_all(store, blobs: dict[Digest, bytes]) -> None:
    for digest, data in blobs.items():
        await store.put(digest, data)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DiskBlobStore]:
    store = await DiskBlobStore(tmp_path / "cas").open()
    yield store
    await store.close()


@pytest.fixture
async def executables(tmp_path: Path) -> AsyncIterator[DiskBlobStore]:
    store = await DiskBlobStore(tmp_path / "executables", file_mode=0o555).open()
    yield store
    await store.close()


class RemoteFetch:
    """Fetches from an in-memory "coordinator"; remembers what it was asked for."""

    def __init__(self, store: DiskBlobStore, remote: dict[Digest, bytes]) -> None:
        self.store, self.remote, self.fetched = store, remote, []

    async def __call__(self, digests) -> None:
        for digest in digests:
            if digest not in self.remote:
                raise InputError(f"{digest} is nowhere", permanent=True)
            self.fetched.append(digest)
            await self.store.put(digest, self.remote[digest])


def sandbox(**options) -> ProcessSandbox:
    # adopt_orphans off: the test runner must not kill children it did not start.
    return ProcessSandbox(ProcessSandboxOptions(adopt_orphans=False, kill_grace_s=0.5,
                                                **options))


def sandbox_request(exec_root: Path, *argv: str, timeout_s: float | None = 30) -> SandboxRequest:
    return SandboxRequest(exec_root=exec_root, arguments=argv, environment=(),
                          working_directory="", spec=SandboxSpec(timeout_s=timeout_s),
                          stdout_path=exec_root.parent / "stdout",
                          stderr_path=exec_root.parent / "stderr")


# -- staging --------------------------------------------------------------------------


async def test_inputs_are_hardlinked_read_only_and_an_action_cannot_change_them(
    tmp_path, store, executables
):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"src": {"input.txt": b"precious"}}, blobs)
    await put_all(store, blobs)
    stager = InputStager(store, RemoteFetch(store, {}), executables=executables)
    exec_root = tmp_path / "exec" / "root"
    staged = await stager.stage(root, exec_root)
    staged_file = exec_root / "src" / "input.txt"
    cached = store.local_path(digest_of(b"precious"))
    assert cached is not None and os.path.samefile(staged_file, cached)
    assert stat.S_IMODE(staged_file.stat().st_mode) == 0o444
    # As root the sandbox runs actions as "nobody", who may not chmod root's files either.
    attack = "echo evil > src/input.txt; " + ("chmod 666 src/input.txt; echo evil > "
                                              "src/input.txt" if AS_ROOT else "true")
    result = await sandbox().run(sandbox_request(exec_root, "/bin/sh", "-c", attack))
    assert result.exit_code != 0
    assert b"Permission denied" in (tmp_path / "exec" / "stderr").read_bytes()
    assert cached.read_bytes() == b"precious"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    staged.release()


async def test_executable_inputs_come_from_a_separate_0555_copy(tmp_path, store, executables):
    blobs: dict[Digest, bytes] = {}
    script = Exe(b"#!/bin/sh\necho ran\n")
    root = blob_tree({"tool.sh": script, "data.sh": bytes(script)}, blobs)
    await put_all(store, blobs)
    stager = InputStager(store, RemoteFetch(store, {}), executables=executables)
    exec_root = tmp_path / "exec" / "root"
    staged = await stager.stage(root, exec_root)
    digest = digest_of(bytes(script))
    tool, data = exec_root / "tool.sh", exec_root / "data.sh"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o555
    assert stat.S_IMODE(data.stat().st_mode) == 0o444  # same bytes, not executable
    assert os.path.samefile(data, store.local_path(digest))
    assert os.path.samefile(tool, executables.local_path(digest))
    assert not os.path.samefile(tool, data)
    result = await sandbox().run(sandbox_request(exec_root, "./tool.sh"))
    assert result.exit_code == 0
    assert (tmp_path / "exec" / "stdout").read_bytes() == b"ran\n"
    staged.release()


async def test_without_a_store_of_executables_they_are_copied(tmp_path, store):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"tool.sh": Exe(b"#!/bin/sh\n")}, blobs)
    await put_all(store, blobs)
    staged = await InputStager(store, RemoteFetch(store, {})).stage(root, tmp_path / "x")
    tool = tmp_path / "x" / "tool.sh"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o555
    assert stat.S_IMODE(store.local_path(digest_of(b"#!/bin/sh\n")).stat().st_mode) == 0o444
    staged.release()


async def test_symlinks_are_staged_as_symlinks_never_followed(tmp_path, store):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"secret": ("symlink", "/etc/shadow"), "dir": {"up": ("symlink", "..")},
                      "dangling": ("symlink", "nowhere/at/all")}, blobs)
    await put_all(store, blobs)
    staged = await InputStager(store, RemoteFetch(store, {})).stage(root, tmp_path / "x")
    assert os.readlink(tmp_path / "x" / "secret") == "/etc/shadow"
    assert os.readlink(tmp_path / "x" / "dir" / "up") == ".."
    assert os.readlink(tmp_path / "x" / "dangling") == "nowhere/at/all"
    staged.release()


async def test_missing_blobs_are_fetched_and_directories_parsed_once(tmp_path, store):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"a": b"one", "d": {"b": b"two", "e": {}}}, blobs)
    fetch = RemoteFetch(store, dict(blobs))
    stager = InputStager(store, fetch)
    staged = await stager.stage(root, tmp_path / "first")
    assert sorted(fetch.fetched) == sorted(blobs)
    assert (tmp_path / "first" / "d" / "b").read_bytes() == b"two"
    assert (tmp_path / "first" / "d" / "e").is_dir()
    assert len(stager.directories) == 3
    assert store.stats().pinned == 5  # 2 files + 3 directories, until released
    staged.release()
    assert store.stats().pinned == 0
    fetch.fetched.clear()
    staged = await stager.stage(root, tmp_path / "second")
    assert fetch.fetched == []
    staged.release()


async def test_an_empty_input_tree_seen_before_is_one_directory_plus_those_asked_for(
        tmp_path, store):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({}, blobs)
    fetch = RemoteFetch(store, dict(blobs))
    stager = InputStager(store, fetch)
    for name in ("first", "second"):  # parsed the first time; known empty the second
        (tmp_path / "link-target").mkdir(exist_ok=True)
        staged = await stager.stage(root, tmp_path / name, also_create=["work", "work/out"])
        assert sorted(p.name for p in (tmp_path / name).rglob("*")) == ["out", "work"]
        assert staged.files == 0 and staged.digests == []
        staged.release()
        assert store.stats().pinned == 0
    assert len(fetch.fetched) == 1
    with pytest.raises(InputError, match="cannot stage inputs"):
        await stager.stage(root, tmp_path / "second")  # exists already


async def test_a_blob_missing_everywhere_is_a_permanent_error(tmp_path, store):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"a": b"lost"}, blobs)
    del blobs[digest_of(b"lost")]
    with pytest.raises(InputError) as caught:
        await InputStager(store, RemoteFetch(store, blobs)).stage(root, tmp_path / "x")
    assert caught.value.permanent


@pytest.mark.parametrize("directory", [
    Directory(files=(FileNode("..", digest_of(b"")),)),
    Directory(files=(FileNode("a/b", digest_of(b"")),)),
    Directory(files=(FileNode("b", digest_of(b"")), FileNode("a", digest_of(b"")))),
    Directory(files=(FileNode("a", digest_of(b"")),), symlinks=(SymlinkNode("a", "x"),)),
])
async def test_a_tree_with_invalid_names_is_a_permanent_error(tmp_path, store, directory):
    data = canonical_bytes(directory)
    await store.put(digest_of(data), data)
    with pytest.raises(InputError, match="invalid input tree") as caught:
        await InputStager(store, RemoteFetch(store, {})).stage(digest_of(data), tmp_path / "x")
    assert caught.value.permanent


# -- outputs --------------------------------------------------------------------------


def command(*outputs: str, workdir: str = "") -> Command:
    return Command(arguments=("true",), output_paths=outputs, working_directory=workdir)


async def test_output_files_and_nested_directories_become_blobs_and_a_tree(tmp_path, store):
    root = tmp_path / "root"
    (root / "out" / "dir" / "sub").mkdir(parents=True)
    (root / "out" / "a.txt").write_bytes(b"file output")
    (root / "out" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "out" / "tool").chmod(0o755)
    (root / "out" / "dir" / "x").write_bytes(b"x")
    (root / "out" / "dir" / "sub" / "y").write_bytes(b"y")
    (root / "out" / "dir" / "sub" / "link").symlink_to("../x")
    uploaded: list[Digest] = []

    async def upload(digests):
        uploaded.extend(digests)

    collected = await collect_outputs(root, command("out/a.txt", "out/tool", "out/dir", "gone"),
                                      store, upload)
    files = {f.path: f for f in collected.output_files}
    assert files["out/a.txt"].digest == digest_of(b"file output")
    assert not files["out/a.txt"].is_executable and files["out/tool"].is_executable
    # Published by hardlink: the bytes were read once, for the hash.
    assert os.path.samefile(store.local_path(digest_of(b"file output")), root / "out" / "a.txt")
    [directory] = collected.output_directories
    assert directory.path == "out/dir"
    tree = decode(await store.get(directory.tree_digest), Tree)
    assert [f.name for f in tree.root.files] == ["x"]
    [sub] = tree.root.directories
    [child] = tree.children
    assert sub.name == "sub" and digest_of(canonical_bytes(child)) == sub.digest
    assert child.symlinks == (SymlinkNode("link", "../x"),)
    assert set(directory.file_digests) == {digest_of(b"x"), digest_of(b"y")}
    assert await store.find_missing(collected.digests) == []
    assert set(uploaded) == set(collected.digests)
    assert "gone" not in files  # a missing output is simply absent


async def test_empty_streams_are_the_empty_blob_without_reading_or_chmodding_them(
        tmp_path, store):
    root = tmp_path / "root"
    root.mkdir()
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    for path in (stdout, stderr):
        path.write_bytes(b"")
        path.chmod(0o600)
    collected = await collect_outputs(root, command(), store, None,
                                      stdout_path=stdout, stderr_path=stderr)
    empty = collected.stdout_digest
    assert empty is not None and empty.is_empty and collected.stderr_digest == empty
    assert stat.S_IMODE(stdout.stat().st_mode) == 0o600  # left as it was, to be reused
    # One that is not empty is hashed and stored as usual, the empty one still not read.
    stdout.write_bytes(b"said it\n")
    collected = await collect_outputs(root, command(), store, None,
                                      stdout_path=stdout, stderr_path=stderr)
    assert collected.stdout_digest == digest_of(b"said it\n")
    assert await store.get(collected.stdout_digest) == b"said it\n"
    assert collected.stderr_digest is not None and collected.stderr_digest.is_empty


async def test_a_symlink_to_a_secret_is_an_output_symlink_never_read(tmp_path, store):
    root = tmp_path / "root"
    root.mkdir()
    (root / "shadow").symlink_to("/etc/shadow")
    (root / "d").mkdir()
    (root / "d" / "shadow").symlink_to("/etc/shadow")
    collected = await collect_outputs(root, command("shadow", "d"), store, None)
    assert [(s.path, s.target) for s in collected.output_symlinks] == [("shadow", "/etc/shadow")]
    tree = decode(await store.get(collected.output_directories[0].tree_digest), Tree)
    assert tree.root.symlinks == (SymlinkNode("shadow", "/etc/shadow"),)
    assert collected.output_files == ()
    assert collected.output_directories[0].file_digests == ()


@pytest.mark.parametrize("where", ["fifo", "dir/fifo"])
async def test_a_fifo_output_is_a_permanent_error_naming_it(tmp_path, store, where):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    os.mkfifo(root / where)
    with pytest.raises(OutputError, match=f"{where} is a FIFO") as caught:
        await collect_outputs(root, command(where.split("/")[0]), store, None)
    assert caught.value.permanent


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a//b"])
async def test_output_paths_leaving_the_root_are_rejected(tmp_path, store, path):
    (tmp_path / "root").mkdir()
    with pytest.raises(OutputError) as caught:
        await collect_outputs(tmp_path / "root", command(path), store, None)
    assert caught.value.permanent


async def test_an_output_under_a_symlinked_directory_is_rejected(tmp_path, store):
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to("/etc")
    with pytest.raises(OutputError, match="symlink out") as caught:
        await collect_outputs(root, command("out/passwd"), store, None)
    assert caught.value.permanent


async def test_outputs_are_relative_to_the_working_directory(tmp_path, store):
    root = tmp_path / "root"
    (root / "pkg" / "gen").mkdir(parents=True)
    (root / "pkg" / "gen" / "o.txt").write_bytes(b"o")
    collected = await collect_outputs(root, command("gen/o.txt", workdir="pkg"), store, None)
    assert [(f.path, f.digest) for f in collected.output_files] == [("gen/o.txt",
                                                                     digest_of(b"o"))]


# -- whole assignments against a real coordinator -------------------------------------


@pytest.fixture
async def rexd_cas(plugin_manager, tmp_path):
    running = await start_rexd(plugin_manager, tmp_path / "rexd")
    yield running
    await running.daemon.stop()


async def submit_blobs(client: RexClient, blobs: dict[Digest, bytes]) -> None:
    for digest, data in blobs.items():
        await client.put_blob(digest, data)


def assignment(cmd: Command, input_root: Digest, blobs: dict[Digest, bytes], *,
               timeout_s: float = 60, name: str = "operations/0a1b") -> Assignment:
    data = canonical_bytes(cmd)
    blobs[digest_of(data)] = data
    action = Action(command_digest=digest_of(data), input_root_digest=input_root)
    action_bytes = canonical_bytes(action)
    blobs[digest_of(action_bytes)] = action_bytes
    return Assignment(operation=name, action_digest=digest_of(action_bytes), action=action,
                      command=cmd, timeout_s=timeout_s, queued_at=1.0)


SCRIPT = Exe(b"#!/bin/sh\nmkdir -p out/tree\ncat in/data.txt > out/copy.txt\n"
             b"echo nested > out/tree/n.txt\nln -s /etc/shadow out/secret\necho said it\n")


@pytest.mark.parametrize("shared", [False, True], ids=["own-store", "shared-store"])
async def test_an_assignment_runs_end_to_end_against_rexd(tmp_path, rexd_cas, shared):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({"run.sh": SCRIPT, "in": {"data.txt": b"input bytes"}}, blobs)
    cmd = Command(arguments=("./run.sh",), environment=(("PATH", "/bin:/usr/bin"),),
                  output_paths=("out/copy.txt", "out/tree", "out/secret"))
    work = assignment(cmd, root, blobs)
    async with RexClient(rexd_cas.url) as client:
        await submit_blobs(client, blobs)
        agent = WorkerAgent(
            rexd_cas.url, sandbox=sandbox(), data_dir=tmp_path / "worker",
            shared_store_root=rexd_cas.runtime.data_dir / "cas" if shared else None,
        )
        async with agent:
            completion = await agent.execute(work)
            await agent.wait_removals()
            assert not list((tmp_path / "worker" / "exec").iterdir())  # cleaned up
        assert completion.error == ""
        result = completion.result
        assert result is not None and result.exit_code == 0
        for digest in result.blob_digests():  # what the scheduler does on a completion
            rexd_cas.runtime.blob_store.refresh(digest)
        files = {f.path: f.digest for f in result.output_files}
        assert await client.get_blob(files["out/copy.txt"]) == b"input bytes"
        assert [(s.path, s.target) for s in result.output_symlinks] == [("out/secret",
                                                                         "/etc/shadow")]
        assert await client.get_blob(result.stdout_digest) == b"said it\n"
        assert await client.find_missing(result.blob_digests()) == []
        meta = result.execution_metadata
        assert meta.worker == agent.worker_id and meta.queued_at == 1.0
        times = [meta.worker_start, meta.input_fetch_start, meta.input_fetch_end,
                 meta.execution_start, meta.execution_end, meta.output_upload_start,
                 meta.output_upload_end, meta.worker_end]
        assert all(t is not None for t in times) and times == sorted(times)
        assert meta.cpu_seconds is not None and meta.peak_memory_bytes
        if shared:  # nothing was fetched: staged straight from the coordinator's store
            assert not (tmp_path / "worker" / "cas").exists()


async def test_an_action_that_times_out_is_reported_as_such(tmp_path, rexd_cas):
    blobs: dict[Digest, bytes] = {}
    root = blob_tree({}, blobs)
    work = assignment(Command(arguments=("/bin/sh", "-c", "echo started; sleep 60")), root,
                      blobs, timeout_s=0.5)
    async with RexClient(rexd_cas.url) as client:
        await submit_blobs(client, blobs)
        async with WorkerAgent(rexd_cas.url, sandbox=sandbox(),
                               data_dir=tmp_path / "worker") as agent:
            completion = await agent.execute(work)
        assert completion.timed_out and completion.error == ""
        assert completion.result.exit_code in (137, 143)
        assert await client.get_blob(completion.result.stdout_digest) == b"started\n"


async def test_faults_of_the_action_are_permanent_and_others_are_not(tmp_path, rexd_cas):
    blobs: dict[Digest, bytes] = {}
    lost: dict[Digest, bytes] = {}
    root = blob_tree({"never-uploaded": b"?"}, lost)
    fifo = assignment(Command(arguments=("/bin/sh", "-c", "mkfifo pipe"), output_paths=("pipe",)),
                      blob_tree({}, blobs), blobs, name="operations/0f1f0")
    missing = assignment(Command(arguments=("true",)), root, blobs, name="operations/0e0e")
    async with RexClient(rexd_cas.url) as client:
        await submit_blobs(client, blobs)
        async with WorkerAgent(rexd_cas.url, sandbox=sandbox(),
                               data_dir=tmp_path / "worker") as agent:
            bad_output = await agent.execute(fifo)
            no_input = await agent.execute(missing)
    assert bad_output.error_is_permanent and "pipe is a FIFO" in bad_output.error
    assert no_input.error_is_permanent and "neither" in no_input.error
    # The coordinator gone: fetching fails, and that is worth a retry elsewhere.
    async with WorkerAgent("http://127.0.0.1:1", sandbox=sandbox(),
                           data_dir=tmp_path / "worker2") as agent:
        unreachable = await agent.execute(missing)
    assert unreachable.error and not unreachable.error_is_permanent



# -- a real `rexd worker` process against a real coordinator ---------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["own-store", "shared-store"])
async def test_rexd_worker_runs_actions_submitted_to_the_coordinator(tmp_path, plugin_manager,
                                                                      shared):
    running = await start_rexd(plugin_manager, tmp_path / "rexd")
    worker = None
    try:
        blobs: dict[Digest, bytes] = {}
        root = blob_tree({"run.sh": SCRIPT, "in": {"data.txt": b"through the coordinator"}},
                         blobs)
        work = assignment(Command(arguments=("./run.sh",), output_paths=("out/copy.txt",),
                                  environment=(("PATH", "/bin:/usr/bin"),)), root, blobs)
        args = [sys.executable, "-m", "rexcore.cli.rexd", "worker", "--coordinator",
                running.url, "--data-dir", str(tmp_path / "worker"), "--property", "os=test",
                "--worker-id", f"e2e-{shared}"]
        if shared:
            args += ["--shared-store", str(running.runtime.data_dir / "cas")]
        worker = await asyncio.create_subprocess_exec(
            *args, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        async with RexClient(running.url) as client:
            await submit_blobs(client, blobs)
            operation = await client.execute(work.action_digest)
            done = await client.wait_operation(operation.name, wait_s=60)
            assert done.done and done.status == "ok", done.message
            assert done.result.exit_code == 0
            copy = {f.path: f.digest for f in done.result.output_files}["out/copy.txt"]
            assert await client.get_blob(copy) == b"through the coordinator"
            assert await client.get_blob(done.result.stdout_digest) == b"said it\n"
            assert done.result.execution_metadata.worker == done.worker == f"e2e-{shared}"
        worker.send_signal(signal.SIGTERM)  # drains, then exits 0
        _, stderr = await asyncio.wait_for(worker.communicate(), 60)
        assert worker.returncode == 0, stderr.decode()
        assert b"joined the coordinator" in stderr
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        await running.daemon.stop()


# -- the synchronize loop, in-process against a real coordinator ------------------------


class FlakyClient(RexClient):
    """A client whose synchronize calls can be cut off, as by a network outage."""

    down = False

    async def synchronize(self, request):
        if self.down:
            from rexcore.protocol.client import ServerUnavailable

            raise ServerUnavailable("the network is cut (test)")
        return await super().synchronize(request)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def wait_for(predicate, what: str, patience_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + patience_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


async def submit(client: RexClient, cmd: Command) -> str:
    blobs: dict[Digest, bytes] = {}
    work = assignment(cmd, blob_tree({}, blobs), blobs)
    await submit_blobs(client, blobs)
    return (await client.execute(work.action_digest, skip_cache_lookup=True)).name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_loop_runs_reports_and_kills_what_the_coordinator_cancels(tmp_path, rexd_cas):
    pid_file = tmp_path / "long.pid"
    # As the test's own user: the action writes into the test's (private) tmp dir.
    agent = WorkerAgent(rexd_cas.url, slots=2, sandbox=sandbox(user="self"),
                        data_dir=tmp_path / "w", wait_s=5)
    serving = asyncio.ensure_future(agent.run())
    try:
        async with RexClient(rexd_cas.url) as client:
            long = await submit(client, Command(arguments=(
                "/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 300")))
            quick = await submit(client, Command(arguments=("/bin/sh", "-c", "echo quick")))
            done = await client.wait_operation(quick, wait_s=30)
            assert done.status == "ok" and done.result.exit_code == 0
            await wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), "start")
            await client.cancel_operation(long)
            pid = int(pid_file.read_text())
            await wait_for(lambda: not pid_alive(pid), "the cancelled action to die")
            again = await submit(client, Command(arguments=("/bin/sh", "-c", "echo again")))
            assert (await client.wait_operation(again, wait_s=30)).status == "ok"
        agent.drain()
        await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()


async def test_the_join_is_confirmed_at_once_not_after_a_long_poll(tmp_path, rexd_cas, caplog):
    """The first call is the join: answered at once, so the worker says it joined even
    when the coordinator has no work (here the long poll would hold ten minutes)."""
    agent = WorkerAgent(rexd_cas.url, sandbox=sandbox(user="self"), data_dir=tmp_path / "w",
                        wait_s=600)
    serving = asyncio.ensure_future(agent.run())
    try:
        with caplog.at_level(logging.INFO, logger="rexcore.worker"):
            await wait_for(lambda: agent._joined, "the join to be confirmed")
        assert any("joined the coordinator" in r.getMessage() for r in caplog.records)
        assert not serving.done()
        agent.drain()
        await asyncio.wait_for(serving, 30)  # a drain ends the held long poll at once
    finally:
        serving.cancel()


async def test_results_survive_an_outage_and_a_drain_waits_for_running_actions(
    tmp_path, rexd_cas
):
    client = FlakyClient(rexd_cas.url)
    started = tmp_path / "started"
    agent = WorkerAgent(rexd_cas.url, sandbox=sandbox(user="self"), data_dir=tmp_path / "w",
                        wait_s=5, client=client)
    serving = asyncio.ensure_future(agent.run())
    try:
        async with RexClient(rexd_cas.url) as submitter:
            name = await submit(submitter, Command(arguments=(
                "/bin/sh", "-c", f"touch {started}; sleep 1; echo finished")))
            await wait_for(started.exists, "the action to start")
            client.down = True
            agent.drain()  # SIGTERM would do the same: finish, report, then return
            await wait_for(lambda: agent._unreported, "the action to finish")
            await asyncio.sleep(0.5)  # retries fail meanwhile; the result is kept
            assert not serving.done()
            client.down = False
            await asyncio.wait_for(serving, 30)
            done = await submitter.wait_operation(name, wait_s=30)
            assert done.status == "ok"
            assert await submitter.get_blob(done.result.stdout_digest) == b"finished\n"
    finally:
        serving.cancel()
        await client.close()


def test_rexd_worker_needs_a_coordinator_and_well_formed_properties(tmp_path):
    missing = run_rexd("worker", "--data-dir", str(tmp_path), REX_COORDINATOR="")
    assert missing.returncode == 2 and "REX_COORDINATOR" in missing.stderr
    bad = run_rexd("worker", "--coordinator", "127.0.0.1:1", "--property", "novalue",
                   "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    unknown = run_rexd("worker", "--coordinator", "127.0.0.1:1", "--sandbox", "nonesuch",
                       "--data-dir", str(tmp_path))
    # Installed plugins add theirs (e.g. "available: linux, process").
    assert unknown.returncode == 1 and "available: " in unknown.stderr
    assert "process" in unknown.stderr.partition("available: ")[2]

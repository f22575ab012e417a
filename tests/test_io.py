"""layerif_jax.io: output directories never lose the user's files, commit atomically,
survive a kill mid-commit, lock out a second writer, and respect the umask."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from layerif_jax.errors import LayerIFError
from conftest import held_output
from layerif_jax.io import (JOURNAL, MANIFEST, UMASK, Lock, OutputDir, OutputFile,
                            atomic_path, parse_bytes, write_json)


def _write(out: OutputDir, files: dict[str, str], **kw):
    with out.staging(**kw) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _hidden(d):
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}"))


def test_new_directory_is_one_rename_and_owned(tmp_path):
    d = tmp_path / "out"
    with OutputDir(d, "scores") as out:
        _write(out, {"scores.json": "1", "per_example.npy": "2"})
    assert sorted(p.name for p in d.iterdir()) == sorted(["scores.json", "per_example.npy", MANIFEST])
    assert json.loads((d / MANIFEST).read_text())["files"] == ["per_example.npy", "scores.json"]
    assert _hidden(d) == []        # no staging folder, no lock file left behind


def test_foreign_files_refused_then_kept_with_overwrite(tmp_path):
    d = tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "important.txt").write_text("mine")
    (d / "sub" / "x").write_text("mine too")
    with pytest.raises(LayerIFError, match=r"important\.txt, sub.*--overwrite"):
        OutputDir(d, "scores", flag="--overwrite").open()
    with OutputDir(d, "scores", overwrite=True) as out:
        _write(out, {"scores.json": "new", "per_val.npy": "v"})
    assert (d / "important.txt").read_text() == "mine"
    assert (d / "sub" / "x").read_text() == "mine too"
    assert (d / "scores.json").read_text() == "new"
    with pytest.raises(LayerIFError, match="important"):   # still the user's files
        OutputDir(d, "scores").open()


def test_rerun_replaces_own_outputs_only(tmp_path):
    d = tmp_path / "out"
    with OutputDir(d, "scores") as out:
        _write(out, {"scores.json": "1", "per_val.npy": "old"})
    with OutputDir(d, "scores") as out:          # only our files: no flag needed
        _write(out, {"scores.json": "2"})
    assert (d / "scores.json").read_text() == "2"
    assert not (d / "per_val.npy").exists()      # our stale output, not written again
    (d / "notes.txt").write_text("user")
    with pytest.raises(LayerIFError, match="notes.txt"):
        OutputDir(d, "scores").open()
    with OutputDir(d, "scores", overwrite=True) as out:
        _write(out, {"scores.json": "3", "per_val.npy": "new"})
    assert (d / "notes.txt").read_text() == "user"
    assert (d / "scores.json").read_text() == "3"
    # another command's outputs are not this command's to replace
    with pytest.raises(LayerIFError, match="did not write"):
        OutputDir(d, "finetune").open()


def test_non_exclusive_commit_keeps_claimed_entries(tmp_path):
    d = tmp_path / "ft"
    with OutputDir(d, "finetune") as out:
        out.claim(["checkpoints"])
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "1").write_text("ck")
        _write(out, {"adapter/a.safetensors": "w", "history.json": "{}"}, exclusive=False)
    m = json.loads((d / MANIFEST).read_text())
    assert m["files"] == ["adapter", "checkpoints", "history.json"]
    with OutputDir(d, "finetune") as out:        # a resume: everything is ours
        _write(out, {"adapter/a.safetensors": "w2", "history.json": "{2}"}, exclusive=False)
    assert (d / "adapter" / "a.safetensors").read_text() == "w2"
    assert (d / "checkpoints" / "1").read_text() == "ck"


def test_existing_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LayerIFError, match="not a directory"):
        OutputDir(f, "scores").open()


_KILL_MID_COMMIT = textwrap.dedent("""
    import os, sys
    from layerif_jax.io import OutputDir
    d = sys.argv[1]
    real, n = os.replace, [0]
    def dying_replace(a, b):
        real(a, b)
        n[0] += 1
        if n[0] == int(sys.argv[2]):
            os._exit(9)          # as if SIGKILLed between two renames
    out = OutputDir(d, "scores", overwrite=True).open()
    with out.staging() as tmp:
        for name in ("a.json", "b.json", "c.json"):
            (tmp / name).write_text("new")
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "w").write_text("new")
        os.replace = dying_replace
""")


@pytest.mark.parametrize("die_after", [1, 2, 4])
def test_kill_between_renames_never_loses_old_or_new(tmp_path, die_after):
    d = tmp_path / "out"
    with OutputDir(d, "scores") as out:
        _write(out, {"a.json": "old", "b.json": "old", "c.json": "old", "adapter/w": "old"})
    (d / "user.txt").write_text("user")
    r = subprocess.run([sys.executable, "-c", _KILL_MID_COMMIT, str(d), str(die_after)])
    assert r.returncode == 9
    assert (d / JOURNAL).is_file()
    for name in ("a.json", "b.json", "c.json"):   # every entry is the old or the new one
        assert (d / name).read_text() in ("old", "new")
    OutputDir(d, "scores", overwrite=True).open().close()   # the next run finishes the commit
    for name in ("a.json", "b.json", "c.json", "adapter/w"):
        assert (d / name).read_text() == "new", name
    assert (d / "user.txt").read_text() == "user"
    assert not (d / JOURNAL).exists() and _hidden(d) == []


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    d = tmp_path / "out"
    from layerif_jax.io import _HOST
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True)
    dead = int(p.stdout)
    stale = tmp_path / f".out.tmp-{_HOST}-{dead}-0123abcd"
    live = tmp_path / f".out.tmp-{_HOST}-{os.getpid()}-89abcdef"
    stale.mkdir()
    live.mkdir()
    OutputDir(d, "scores").open().close()
    assert not stale.exists() and live.exists()


def test_second_writer_fails_fast_naming_the_first(tmp_path):
    d = tmp_path / "out"
    with held_output(d) as pid:
        t0 = time.perf_counter()
        with pytest.raises(LayerIFError, match=rf"being written by process {pid} \(scores"):
            OutputDir(d, "scores").open()
        assert time.perf_counter() - t0 < 1.0
    OutputDir(d, "scores").open().close()   # the kernel dropped the dead holder's lock


def test_lock_file_is_removed_and_relockable(tmp_path):
    target = tmp_path / "x"
    with Lock(target):
        assert (tmp_path / ".x.lock").is_file()
        with pytest.raises(LayerIFError, match="being written"):
            Lock(target).acquire()
    assert not (tmp_path / ".x.lock").exists()
    with Lock(target):
        pass


def test_unwritable_parent_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LayerIFError, match="cannot write"):
            OutputDir(ro / "out", "scores").open()
    finally:
        ro.chmod(0o700)


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(LayerIFError, match="not a directory"):
        OutputDir(tmp_path / "f" / "out", "scores").open()


def test_modes_follow_umask(tmp_path):
    d = tmp_path / "out"
    with OutputDir(d, "scores") as out:
        _write(out, {"scores.json": "1"})
    write_json(tmp_path / "single.json", {})
    assert (d.stat().st_mode & 0o777) == 0o777 & ~UMASK
    assert ((d / "scores.json").stat().st_mode & 0o777) == 0o666 & ~UMASK
    assert ((tmp_path / "single.json").stat().st_mode & 0o777) == 0o666 & ~UMASK
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys; os.umask(0o027)
        from layerif_jax.io import write_json, OutputDir
        write_json(sys.argv[1] + "/u.json", {})
        with OutputDir(sys.argv[1] + "/u", "x") as o:
            with o.staging() as t:
                (t / "f").write_text("")
        """), str(tmp_path)])
    assert r.returncode == 0
    assert ((tmp_path / "u.json").stat().st_mode & 0o777) == 0o640
    assert ((tmp_path / "u").stat().st_mode & 0o777) == 0o750


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_output_file(tmp_path):
    f = tmp_path / "alloc.json"
    f.write_text('{"mine": 1}')
    with pytest.raises(LayerIFError, match="not written by layerif.*--overwrite"):
        OutputFile(f, "allocate experts", flag="--overwrite").open()
    with OutputFile(f, "allocate experts", overwrite=True) as out:
        out.write_json({"experts": [1, 2]})
    with OutputFile(f, "allocate experts") as out:   # ours now: replaced without the flag
        out.write_json({"experts": [3]})
    assert json.loads(f.read_text())["experts"] == [3]
    with pytest.raises(LayerIFError, match="is a directory"):
        OutputFile(tmp_path, "allocate experts").open()


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1e9", 10**9),
                                        (" 2 kb ", 2000), (1000, 1000), ("0", 0), ("1.5GiB", 3 * 2**29)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["infGB", "inf", "-1GB", "-5", "8 parsecs", "", float("nan"), True])
def test_parse_bytes_refuses(text):
    with pytest.raises(LayerIFError):
        parse_bytes(text, "memory budget")

"""The flow's reading of git output, on real repositories: `git status` and file lists come back
whole, whatever the first entry, the names or the kind of change."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.workspace import git_entries, uncommitted_changes


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repo with one commit of params.yaml and a few other files."""
    git(tmp_path, "init", "--quiet")
    for key, value in {
        "user.name": "Test", "user.email": "test@example.com", "commit.gpgsign": "false",
        "status.renames": "true",  # whatever the machine's global config says
    }.items():
        git(tmp_path, "config", "--local", key, value)
    for name in ("params.yaml", "zeta.py", "old.txt", "a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text(f"{name}\n", encoding="utf-8")
    git(tmp_path, "add", "--all")
    git(tmp_path, "commit", "--quiet", "-m", "first")
    return tmp_path


def edit(repo: Path, name: str) -> None:
    with (repo / name).open("a", encoding="utf-8") as fh:
        fh.write("changed\n")


def commit_file(repo: Path, name: str) -> None:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text("content\n", encoding="utf-8")
    git(repo, "add", "--", name)
    git(repo, "commit", "--quiet", "-m", f"add {name}")


def test_a_clean_checkout_has_no_changes(repo):
    (repo / "untracked.txt").write_text("x\n")  # untracked files are not reported
    assert uncommitted_changes(repo) == []


def test_an_unstaged_first_entry_comes_back_whole(repo):
    # `git status --porcelain` starts this output with a blank (" M params.yaml"), which stripping loses
    edit(repo, "params.yaml")
    edit(repo, "zeta.py")
    assert uncommitted_changes(repo) == ["params.yaml", "zeta.py"]


def test_a_rename_gives_the_new_path_only(repo):
    git(repo, "mv", "old.txt", "new.txt")
    edit(repo, "params.yaml")
    assert uncommitted_changes(repo) == ["new.txt", "params.yaml"]


def test_a_rename_with_unstaged_edits_and_spaces_in_both_names(repo):
    commit_file(repo, "old name.txt")
    git(repo, "mv", "old name.txt", "a new name.txt")
    edit(repo, "a new name.txt")
    assert uncommitted_changes(repo) == ["a new name.txt"]


def test_names_with_spaces_come_back_unquoted(repo):
    commit_file(repo, " leading and inner spaces .yaml")
    edit(repo, " leading and inner spaces .yaml")
    assert uncommitted_changes(repo) == [" leading and inner spaces .yaml"]


def test_non_ascii_names_come_back_unquoted(repo):
    # without -z, git prints "caf\303\251 \342\200\224 notes.txt" in double quotes
    commit_file(repo, "café — notes.txt")
    commit_file(repo, "données/params.yaml")
    edit(repo, "café — notes.txt")
    edit(repo, "données/params.yaml")
    assert uncommitted_changes(repo) == ["café — notes.txt", "données/params.yaml"]


def test_staged_and_unstaged_changes_are_all_reported(repo):
    edit(repo, "a.txt")
    git(repo, "add", "a.txt")  # staged: "M  a.txt"
    edit(repo, "b.txt")  # unstaged: " M b.txt"
    edit(repo, "c.txt")
    git(repo, "add", "c.txt")
    edit(repo, "c.txt")  # both: "MM c.txt"
    git(repo, "rm", "--quiet", "d.txt")  # staged deletion: "D  d.txt"
    (repo / "e.txt").write_text("new\n")
    git(repo, "add", "e.txt")  # staged addition: "A  e.txt"
    (repo / "zeta.py").unlink()  # unstaged deletion: " D zeta.py"
    assert uncommitted_changes(repo) == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "zeta.py"]


def test_file_lists_keep_spaces_and_non_ascii(repo):
    """The `ls-files -z` the checkout uses to find the `.dvc` files."""
    for name in ("data/raw.dvc", "my data/raw set.dvc", "données/brut.dvc"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("outs: []\n", encoding="utf-8")
    git(repo, "add", "data/raw.dvc", "my data/raw set.dvc")
    assert git_entries(repo, "ls-files", "-z", "*.dvc") == ["data/raw.dvc", "my data/raw set.dvc"]
    assert sorted(git_entries(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.dvc")) == [
        "data/raw.dvc", "données/brut.dvc", "my data/raw set.dvc",
    ]

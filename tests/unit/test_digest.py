"""Tree digests: equal for equal trees, different for any change rsync would carry."""

import os

from flakefleet.digest import tree_digest


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "flake.nix").write_text("{ }\n")
    (root / "sub" / "a.txt").write_text("a")
    os.symlink("sub/a.txt", root / "link")
    return root


def test_same_content_same_digest(tmp_path):
    assert tree_digest(make_tree(tmp_path / "x")) == tree_digest(make_tree(tmp_path / "y"))


def test_every_change_changes_the_digest(tmp_path):
    root = make_tree(tmp_path / "x")
    seen = {tree_digest(root)}
    (root / "sub" / "a.txt").write_text("b")
    seen.add(tree_digest(root))
    (root / "sub" / "a.txt").chmod(0o755)
    seen.add(tree_digest(root))
    os.remove(root / "link")
    os.symlink("flake.nix", root / "link")
    seen.add(tree_digest(root))
    (root / "empty").mkdir()
    seen.add(tree_digest(root))
    (root / "sub" / "a.txt").rename(root / "sub" / "b.txt")
    seen.add(tree_digest(root))
    assert len(seen) == 6


def test_git_metadata_is_not_part_of_the_source(tmp_path):
    root = make_tree(tmp_path / "x")
    before = tree_digest(root)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert tree_digest(root) == before

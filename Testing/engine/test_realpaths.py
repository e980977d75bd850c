"""While torch loads, the engine resolves each folder once in ``os.path.realpath`` (samembed.realpaths): the same
answers as Python's own, for links to folders and to files, dangling links, missing files and every loaded module's
file; Python's own is back afterwards."""

from __future__ import annotations

import os
import posixpath
import sys

import pytest

from samembed import realpaths

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the memoised realpath is POSIX only")


@pytest.fixture
def memoised():
    own = posixpath.realpath
    assert realpaths.memoise_realpath()
    try:
        yield own
    finally:
        realpaths.restore_realpath()
    assert posixpath.realpath is own and os.path.realpath is own


def _tree(root):
    """Folders, files and links of every kind: a link to a folder, a link to a link, a link to a file, a relative
    link, a dangling link, a link loop."""
    (root / "real" / "deep").mkdir(parents=True)
    (root / "real" / "deep" / "file.py").write_text("")
    (root / "real" / "other.py").write_text("")
    (root / "to_real").symlink_to(root / "real")
    (root / "to_to_real").symlink_to(root / "to_real")
    (root / "real" / "deep" / "alias.py").symlink_to("../other.py")  # relative, to a file
    (root / "real" / "dangling.py").symlink_to(root / "nowhere" / "x.py")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return [
        root / "real" / "deep" / "file.py", root / "to_real" / "deep" / "file.py",
        root / "to_to_real" / "deep" / "file.py", root / "to_real" / "deep" / "alias.py",
        root / "real" / "deep" / "alias.py", root / "to_real" / "dangling.py", root / "to_real" / "missing.py",
        root / "nowhere" / "missing.py", root / "loop_a" / "x.py", root / "loop_a", root / "to_real",
        root / "to_real" / "deep", root / "real" / "other.py" / "not_a_folder.py",
    ]


def test_each_path_resolves_as_with_pythons_own(tmp_path, memoised):
    own = memoised
    paths = [str(p) for p in _tree(tmp_path)]
    # not normalised, relative, bytes, the root: handed to Python's own, the same answers
    paths += [str(tmp_path / "to_real") + "/deep/../other.py", str(tmp_path / "to_real") + "/", "/",
              str(tmp_path / "to_real") + "//deep/file.py", "relative/name.py", "./x", "//double_root"]
    paths += [m.__file__ for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)]
    for _ in range(2):  # the second time from the folders resolved the first
        for p in paths:
            assert os.path.realpath(p) == own(p), p
    assert os.path.realpath(os.fsencode(paths[1])) == own(os.fsencode(paths[1]))
    with pytest.raises(FileNotFoundError):  # strict: Python's own, its error
        os.path.realpath(str(tmp_path / "to_real" / "missing.py"), strict=True)


def test_a_link_made_after_its_folder_was_resolved_is_still_followed(tmp_path, memoised):
    own = memoised
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "a.py"
    target.write_text("")
    assert os.path.realpath(str(target)) == own(str(target))
    (tmp_path / "real" / "b.py").symlink_to(target)  # in a folder resolved before: the name's own link is checked
    assert os.path.realpath(str(tmp_path / "real" / "b.py")) == str(target.resolve())


def test_it_is_replaced_once_and_put_back():
    own = posixpath.realpath
    assert realpaths.memoise_realpath() and posixpath.realpath is not own and os.path.realpath is posixpath.realpath
    try:
        assert not realpaths.memoise_realpath(), "a second call must not wrap the memoised one"
    finally:
        realpaths.restore_realpath()
    assert posixpath.realpath is own
    realpaths.restore_realpath()  # nothing to put back: nothing happens
    assert posixpath.realpath is own

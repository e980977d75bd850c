"""What a new user met (issue 17): file modes, 2D defaults, option validation, quiet output, help texts."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samembed.cli import main
from samembed.errors import InputError
from samembed.io import read_points, write_text_atomic
from samembed.options import MatchOptions

from ..conftest import REPO, data_file, hand_model, hand_radiographs


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------- permissions
def test_an_atomically_written_file_follows_the_umask_not_owner_only(tmp_path, umask_027):
    path = write_text_atomic(tmp_path / "out.csv", "a\n")
    assert mode(path) == 0o640
    os.umask(0o022)
    path = write_text_atomic(tmp_path / "out2.csv", "a\n")
    assert mode(path) == 0o644


def test_a_file_written_again_keeps_its_permissions_and_a_link_is_written_through(tmp_path, umask_027):
    """A user who restricted a result file of patient data (chmod 600) keeps it restricted when a rerun writes it
    again (it was widened to the umask's 0640/0644); an output that is a symbolic link gets the new content in its
    target, as the shell's ``>`` gives it (the link was replaced by a file, and the target kept the old content)."""
    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    write_text_atomic(private, "new\n")
    assert private.read_text() == "new\n" and mode(private) == 0o600
    target = tmp_path / "results" / "matches.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()], "a temporary file was left behind"


@pytest.mark.needs_data
def test_every_file_samembed_match_writes_is_readable_by_the_group(tmp_path, umask_027):
    ct = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    pts = tmp_path / "p.csv"
    pts.write_text("label,x,y,z\nA,0,0,0\n")
    from samembed.io import read_image

    centre = read_image(ct).grid.index_to_lps([[64, 64, 64]])[0]
    pts.write_text(f"label,x,y,z\nA,{centre[0]},{centre[1]},{centre[2]}\n")
    out, hm, cache = tmp_path / "res", tmp_path / "hm", tmp_path / "cache"
    code = main(["match", str(ct), str(ct), "--points", str(pts), "--out", f"{out}/", "--heatmap-dir", str(hm),
                 "--cache-dir", str(cache), "--model", "random:sam-lite", "--device", "cpu", "--quiet", "--no-polish"])
    assert code == 0
    written = [p for d in (out, hm, cache) for p in Path(d).rglob("*") if p.is_file()]
    assert len(written) >= 3 and {p.suffix for p in written} >= {".json", ".gz"}
    assert all(mode(p) == 0o640 for p in written), {p.name: oct(mode(p)) for p in written}


# --------------------------------------------------------------------------------------- points files
def test_a_2d_points_csv_is_accepted_with_or_without_a_header(tmp_path):
    (tmp_path / "h.csv").write_text("label,x,y\nA,1.5,2\nB,3,4\n")
    (tmp_path / "n.csv").write_text("A,1.5,2\nB,3,4\n")
    for name in ("h.csv", "n.csv"):
        pl = read_points(tmp_path / name)
        assert pl.labels == ["A", "B"]
        np.testing.assert_allclose(pl.points_lps_mm, [[1.5, 2, 0], [3, 4, 0]])


def test_a_csv_without_a_header_names_the_file_line_of_a_bad_value(tmp_path):
    (tmp_path / "p.csv").write_text("A,1,zz,3\n")
    with pytest.raises(InputError, match=r"p.csv: line 1: 'zz' is not a number"):
        read_points(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("# my points\nlabel,x,y,z\nA,1,2,3\nB,1,2\n")
    with pytest.raises(InputError, match=r"q.csv: line 4 has 3 columns; expected label,x,y,z"):
        read_points(tmp_path / "q.csv")


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", [-5.0, float("nan"), float("inf")])
def test_a_negative_or_nan_window_is_a_clear_input_error(value):
    with pytest.raises(InputError, match="prior_window_mm must be a finite number >= 0"):
        MatchOptions(prior_window_mm=value)


def test_unknown_or_mistyped_options_are_clear_input_errors():
    with pytest.raises(InputError, match=r"unknown match option 'polsh' \(did you mean 'polish'\?\); known: .*polish"):
        MatchOptions.from_mapping({"polsh": False})
    # the constructor and help() too (Python's TypeError and a KeyError before), and numpy's numbers are numbers
    with pytest.raises(InputError, match="unknown match option 'speed'"):
        MatchOptions(speed=2)
    with pytest.raises(InputError, match="unknown match option 'polsh'"):
        MatchOptions.help("polsh")
    with pytest.raises(InputError, match=r"polish_levels must be \(step, template, search\) mm triples"):
        MatchOptions(polish_levels=5)
    import numpy as np

    o = MatchOptions(prior_window_mm=np.float32(30), polish=np.bool_(False), polish_min_ncc=np.float64(0.4))
    assert (o.prior_window_mm, o.polish, o.polish_min_ncc) == (30.0, False, 0.4)
    assert type(o.prior_window_mm) is float and type(o.polish) is bool
    assert "polish_min_ncc: a polished position is kept only where" in (MatchOptions.__doc__ or "")
    with pytest.raises(InputError, match="unknown match option"):
        MatchOptions().replace(window=3)
    with pytest.raises(InputError, match="polish must be true or false"):
        MatchOptions(polish="yes")
    with pytest.raises(InputError, match="polish_min_ncc must be a number in"):
        MatchOptions(polish_min_ncc=2.0)
    with pytest.raises(InputError, match="box_lps_mm must be 6 finite numbers"):
        MatchOptions(box_lps_mm=(0, 0, 0, 1, 1))
    with pytest.raises(InputError, match="polish_levels must be"):
        MatchOptions(polish_levels=((1.0, 2.0),))
    # a level far too fine for its size asked for terabytes at once, an internal error (an audit)
    with pytest.raises(InputError, match=r"polish level \(0.01, 100, 100\) mm reaches 20000 steps .* at most 32"):
        MatchOptions(polish_levels=((0.01, 100.0, 100.0),))
    assert MatchOptions(polish_levels=((1.0, 24.0, 8.0),)).polish_levels == ((1.0, 24.0, 8.0),)  # 32 steps: allowed


def test_match_options_are_frozen_and_round_trip_through_a_mapping():
    o = MatchOptions(refine=True, box_lps_mm=[[0, 0, 0], [10, 10, 10]])
    with pytest.raises(AttributeError):
        o.refine = False  # type: ignore[misc]
    assert o.box_lps_mm == (0.0, 0.0, 0.0, 10.0, 10.0, 10.0)
    assert MatchOptions.from_mapping(o.to_dict()) == o


@pytest.mark.parametrize("flag", [["--prior-window", "-5"], ["--prior-window", "nan"], ["--polish-min-ncc", "3"]])
def test_bad_match_flags_exit_2_before_any_output_folder_is_made(tmp_path, flag, capsys):
    out, hm = tmp_path / "out", tmp_path / "hm"
    code = main(["match", "a.nii.gz", "b.nii.gz", "--points", "p.csv", "--out", f"{out}/", "--heatmap-dir", str(hm), *flag])
    assert code == 2
    assert flag[0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_files_leave_no_output_folder_behind(tmp_path, capsys):
    out, hm = tmp_path / "out", tmp_path / "hm"
    (tmp_path / "p.csv").write_text("label,x,y,z\nA,1,2,3\n")
    code = main(["match", str(tmp_path / "missing.nii.gz"), str(tmp_path / "missing2.nii.gz"), "--points",
                 str(tmp_path / "p.csv"), "--out", f"{out}/", "--heatmap-dir", str(hm)])
    assert code == 2 and "missing.nii.gz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_every_match_option_is_reachable_from_the_cli():
    from samembed.cli import _OPTION_FLAGS, build_parser, match_options_from_args

    names = {f for f in MatchOptions.__dataclass_fields__ if f != "heatmap"}  # heatmap: --heatmap-dir
    assert set(_OPTION_FLAGS) == names
    args = build_parser().parse_args([
        "match", "s", "t", "--points", "p", "--out", "o", "--prior-window", "30", "--global-window", "10",
        "--no-body-mask", "--box", "0", "0", "0", "9", "9", "9", "--refine", "--refine-window", "12", "--consistency",
        "--consistency-inlier", "11", "--consistency-window", "13", "--no-polish", "--polish-min-ncc", "0.7",
        "--polish-levels", "2,16,8;1,8,2", "--roundtrip-tolerance", "6"])
    o = match_options_from_args(args)
    assert o == MatchOptions(prior_window_mm=30, global_window_mm=10, search_body=False, box_lps_mm=(0, 0, 0, 9, 9, 9),
                             refine=True, refine_window_mm=12, consistency=True, consistency_inlier_mm=11,
                             consistency_window_mm=13, polish=False, polish_min_ncc=0.7,
                             polish_levels=((2, 16, 8), (1, 8, 2)), roundtrip_tolerance_mm=6)
    defaults = match_options_from_args(build_parser().parse_args(["match", "s", "t", "--points", "p", "--out", "o"]))
    assert defaults == MatchOptions()


# ------------------------------------------------------------------------------------- help and logs
def test_train_help_lists_every_objective_and_the_help_does_not_import_torch():
    code = ("import sys; from samembed.cli import build_parser; import contextlib, io\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
            "    build_parser().parse_args(['train', '--help'])\n"
            "print(buf.getvalue()); print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("sam:", "isimed:", "adam:", "sal:", "semantic:"):
        assert name in out.replace("\n", " ")
    assert "TORCH False" in out


@pytest.mark.needs_data
def test_quiet_prints_nothing_and_default_names_the_phases(tmp_path):
    ct = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    from samembed.io import read_image

    c = read_image(ct).grid.index_to_lps([[64, 64, 64]])[0]
    (tmp_path / "p.csv").write_text(f"label,x,y,z\nA,{c[0]},{c[1]},{c[2]}\n")
    cmd = [sys.executable, "-m", "samembed.cli", "match", str(ct), str(ct), "--points", str(tmp_path / "p.csv"),
           "--model", "random:sam-lite", "--device", "cpu", "--no-polish"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAMEmbedding"), os.environ.get("PYTHONPATH", "")]))
    run = {"capture_output": True, "text": True, "encoding": "utf-8", "errors": "replace", "env": env}
    quiet = subprocess.run([*cmd, "--out", str(tmp_path / "q.csv"), "-q"], **run)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([*cmd, "--out", str(tmp_path / "l.csv")], **run)
    assert loud.returncode == 0
    for phase in ("reading", "embedding source", "embedding target 1/1", "matching 1/1", "writing"):
        assert phase in loud.stderr, loud.stderr
    assert "wrote" in loud.stdout
    # stderr is a pipe here, as in a log or a batch job: one line per phase with the seconds since the command
    # started (torch's import first), not a redrawn bar; the time the command reports counts from its start too
    assert "\r" not in loud.stderr
    phases = [line for line in loud.stderr.splitlines() if " s  " in line]
    assert phases[0].split(" s  ", 1)[1] == "loading torch", loud.stderr
    times = [float(line.split(" s  ", 1)[0]) for line in phases]
    assert times == sorted(times), loud.stderr
    reported = float(loud.stdout.rsplit(" in ", 1)[1].split(" s")[0])
    assert reported >= times[-1] > 0, (loud.stdout, loud.stderr)


# ------------------------------------------------------------------------------------- 2D defaults
@pytest.mark.needs_data
def test_the_default_model_resolves_to_the_2d_model_for_radiographs(tmp_path):
    hand_model()  # the default model for radiographs is this file
    jpgs = hand_radiographs(2)
    (tmp_path / "p.csv").write_text("label,x,y\nA,60,80\nB,100,120\n")
    out = tmp_path / "o.csv"
    code = main(["match", str(jpgs[0]), str(jpgs[1]), "--points", str(tmp_path / "p.csv"), "--out", str(out),
                 "--spacing", "0.2", "--device", "cpu", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["A", "B"] and all(float(r["z"]) == 0.0 for r in rows)


def test_a_model_of_the_wrong_dimension_names_the_models_that_fit():
    from samembed import Matcher
    from samembed.image import Image

    rng = np.random.default_rng(0)
    img = Image.from_array((rng.random((64, 64)) * 1000).astype(np.int16), name="xray.png")
    with pytest.raises(InputError, match=r"xray.png: a 2D image cannot be embedded by the 3D model .*--model sam-lite-2d-hand"):
        Matcher("random:sam-lite", device="cpu").match(img, [[10.0, 10.0, 0.0]], [img])


# ------------------------------------------------------------------------------------------ heatmaps
@pytest.mark.needs_data
def test_heatmap_files_are_compact_and_read_the_reported_score_at_the_match(tmp_path):
    from samembed.io import read_image

    ct = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    c = read_image(ct).grid.index_to_lps([[64, 64, 64], [50, 70, 40]])
    (tmp_path / "p.csv").write_text("label,x,y,z\n" + "".join(f"P{i},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(c)))
    out, hm = tmp_path / "o.csv", tmp_path / "hm"
    assert main(["match", str(ct), str(ct), "--points", str(tmp_path / "p.csv"), "--out", str(out), "--heatmap-dir",
                 str(hm), "--model", "random:sam-lite", "--device", "cpu", "-q"]) == 0
    for row in csv.DictReader(out.open()):
        path = hm / f"pt_201_ct_{row['label']}_heatmap.nii.gz"
        assert path.stat().st_size < 3_000_000  # a 128^3 float map: 6.8 MB before rounding to 2^-12
        img = read_image(path)
        p = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
        ijk = np.floor(img.grid.lps_to_index(p[None])[0] + 0.5).astype(int)
        assert abs(float(img.array[tuple(ijk[::-1])]) - float(row["score"])) < 3e-4


def test_a_flags_default_in_the_help_is_written_as_the_flag_takes_it(capsys):
    """`--polish-levels` showed its default as nested lists ([[2.0, 16.0, 8.0], ...]), which the flag does not take;
    the help's form, typed back, gives the default."""
    from samembed.cli import build_parser, match_command_options
    from samembed.options import DEFAULT_POLISH_LEVELS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["match", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2,16,8;1,10,2;0.5,6,1)" in text and "[[" not in text
    args = build_parser().parse_args(["match", "a", "b", "--points", "p.csv", "--out", "o.csv",
                                      "--polish-levels", "2,16,8;1,10,2;0.5,6,1"])
    assert match_command_options(args).polish_levels == DEFAULT_POLISH_LEVELS
    assert "(default: [[2.0, 16.0, 8.0], [1.0, 10.0, 2.0]" in MatchOptions.help("polish_levels")  # Python's form

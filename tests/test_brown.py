"""The Brown Corpus source: Form C tags stripped into prose, the split by sample, the cache files."""

import io
import json
import tarfile

from rcpu.brown import build_brown, detag, eval_sample


def test_detag_gives_ordinary_prose():
    tagged = ("The/at jury/nn said/vbd ``/`` deserves/vbz the/at praise/nn ''/'' ,/, and/cc it/pps "
              "did/dod n't/* (/( really/rb )/) ./.")
    assert detag(tagged) == 'The jury said "deserves the praise", and it didn\'t (really).'


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_build_splits_by_sample_and_skips_other_files(tmp_path):
    names = [f"c{letter}{i:02d}" for letter in "ab" for i in range(1, 11)]
    files = {n: f"\n\n\tA/at sentence/nn of/in {n}/np ./.\n\n\tAnother/dt one/cd ./.\n" for n in names}
    files["README"] = "not a sample"
    _tgz(tmp_path / "c.tgz", files)
    out = tmp_path / "out"
    out.mkdir()
    meta = build_brown(tmp_path / "c.tgz", out)
    evals = [n for n in names if eval_sample(n)]
    assert meta["samples"] == {"calib": len(names) - len(evals), "eval": len(evals)} and evals
    text = (out / "eval.txt").read_text()
    assert text.split("\n\n")[0] == f"A sentence of {evals[0]}. Another one."
    assert "README" not in (out / "calib.txt").read_text() + text
    assert json.loads((out / "meta.json").read_text())["eval_samples"] == evals

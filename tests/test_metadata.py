import bz2
import sqlite3

import numpy as np
import pytest

from pipeline.metadata import (InputError, ScanStats, SubsetIds, detect_format, read_metadata, url_hash)


SQL_COLS = ["photoid", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title", "description",
            "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl", "downloadurl", "licensename",
            "licenseurl", "serverid", "farmid", "secret", "secretoriginal", "ext", "marker"]


def test_subset_ids_compact_and_counted(tmp_path):
    p = tmp_path / "subset.tsv"
    p.write_text("1\t30\ta\n2\t10\tb\n3\t20\tc\n4\t10\tb\nbroken line\n5\t40\td\n")
    stats = ScanStats()
    s = SubsetIds.from_file(p, stats, progress=False)
    assert s.ids.dtype == np.int64 and s.ids.tolist() == [10, 20, 30, 40]
    assert stats.counts["duplicate_subset_id"] == 1 and stats.counts["subset_malformed"] == 1
    assert stats.examples["subset_malformed"][0].startswith(f"{p}:5:")
    assert s.lookup(np.array([20, 25, 40, 99, 5])).tolist() == [1, -1, 3, -1, -1]


def test_tsv_rows_and_counters(yfcc_fixture):
    fx = yfcc_fixture
    stats = ScanStats()
    subset = SubsetIds.from_file(fx.subset, stats, progress=False)
    rows = list(read_metadata(fx.metadata, subset, stats, progress=False))
    ids = [r.photoid for r in rows]
    assert len(ids) == len(set(ids))                        # duplicate metadata row dropped
    assert 1000 in ids and 4004 not in ids and 4001 not in ids
    for reason in ("malformed", "non_utf8", "duplicate_photo"):
        assert stats.counts[reason] == len(fx.lines[reason])
        assert [e.split(":")[1] for e in stats.examples[reason]] == [str(n) for n in fx.lines[reason]]
    assert stats.counts["not_in_subset"] == 1
    assert stats.counts["rows_read"] == len(fx.metadata.read_bytes().splitlines())
    video = [r for r in rows if r.is_video]
    assert [r.photoid for r in video] == [4003]
    assert set(subset.missing().tolist()) == {4000, 4001, 9001, 9002} - {4001}   # 4001 read, bad bytes


def test_bz2_and_truncated_bz2(yfcc_fixture, tmp_path):
    fx = yfcc_fixture
    data = bz2.compress(fx.metadata.read_bytes() * 40, compresslevel=1)   # 100 kB blocks
    whole, cut = tmp_path / "m.bz2", tmp_path / "cut.tsv.bz2"
    whole.write_bytes(data)
    cut.write_bytes(data[: len(data) // 2])
    assert detect_format(whole) == "bz2"
    full_stats, cut_stats = ScanStats(), ScanStats()
    n_full = sum(1 for _ in read_metadata(whole, None, full_stats, progress=False))
    n_cut = sum(1 for _ in read_metadata(cut, None, cut_stats, progress=False))
    assert full_stats.counts["truncated_input"] == 0
    assert cut_stats.counts["truncated_input"] == 1 and 0 < n_cut < n_full
    assert cut_stats.examples["truncated_input"][0].startswith(f"{cut}:")
    # concatenated bz2 streams (pbzip2 / lbzip2 output) are read to the end
    multi = tmp_path / "multi.bz2"
    multi.write_bytes(data + bz2.compress(fx.metadata.read_bytes()))
    multi_stats = ScanStats()
    assert sum(1 for _ in read_metadata(multi, None, multi_stats, progress=False)) == n_full * 41 // 40
    assert multi_stats.counts["truncated_input"] == 0


@pytest.mark.parametrize("kind", ["subset_as_metadata", "jpeg", "csv"])
def test_wrong_file_raises_with_file_and_line(yfcc_fixture, tmp_path, kind):
    fx = yfcc_fixture
    if kind == "subset_as_metadata":
        path = fx.subset
    elif kind == "jpeg":
        path = next((fx.root / "images").glob("*.jpg"))
    else:
        path = tmp_path / "meta.csv"
        path.write_text("\n".join(",".join(["1"] * 25) for _ in range(150)))
    with pytest.raises(InputError, match=rf"{path}:1: .*columns"):
        list(read_metadata(path, None, ScanStats(), progress=False))
    if kind == "jpeg":
        with pytest.raises(InputError, match=rf"{path}:\d+: .*subset"):
            SubsetIds.from_file(path, ScanStats(), progress=False)


def test_sqlite_form_joined_on_photo_id(yfcc_fixture, tmp_path):
    fx = yfcc_fixture
    db = tmp_path / "yfcc100m_dataset.sql"
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE yfcc100m_dataset ({', '.join(SQL_COLS)})")
    tsv = []
    for line in fx.metadata.read_bytes().splitlines():
        f = line.split(b"\t")
        if len(f) != 25:
            continue
        cols = [c if i in (6, 7) else c.decode("utf-8", "replace") for i, c in enumerate(f[1:2] + f[3:24] + f[24:])]
        cols = [c.decode("utf-8") if isinstance(c, bytes) and not (b"\xff" in c) else c for c in cols]
        con.execute(f"INSERT INTO yfcc100m_dataset VALUES ({', '.join('?' * 23)})", cols)
        tsv.append(f)
    con.commit()
    con.close()
    assert detect_format(db) == "sqlite"
    s1, s2 = ScanStats(), ScanStats()
    from_sql = list(read_metadata(db, SubsetIds.from_file(fx.subset, s1, progress=False), s1, progress=False))
    from_tsv = list(read_metadata(fx.metadata, SubsetIds.from_file(fx.subset, s2, progress=False), s2, progress=False))
    key = lambda r: (r.photoid, r.title, r.description, r.download_url, r.is_video)  # noqa: E731
    assert [key(r) for r in from_sql] == [key(r) for r in from_tsv]
    assert s1.counts["non_utf8"] == 1 and s1.counts["duplicate_photo"] == 1
    assert all(r.hash == url_hash(r.download_url) for r in from_sql)
    bad = tmp_path / "other.sql"
    sqlite3.connect(bad).execute("CREATE TABLE t (a, b)").connection.commit()
    with pytest.raises(InputError, match=f"{bad}:1: no table"):
        list(read_metadata(bad, None, ScanStats(), progress=False))


def test_url_hash_drops_leading_zeros():
    h = url_hash("http://farm1.staticflickr.com/1/1_a.jpg")
    assert 16 <= len(h) <= 32 and all(c in "0123456789abcdef" for c in h)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_an_empty_file_is_an_input_error(tmp_path, content):
    """An empty metadata or subset file is a wrong input, not a data set of 0 photos."""
    path = tmp_path / "empty.tsv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"{path}: no rows at all \(an empty file\? expected the YFCC100M metadata"):
        list(read_metadata(path, None, ScanStats(), progress=False))
    with pytest.raises(InputError, match=rf"{path}: no rows at all .*subset"):
        SubsetIds.from_file(path, ScanStats(), progress=False)
    bz = tmp_path / "empty.tsv.bz2"
    bz.write_bytes(bz2.compress(content))
    with pytest.raises(InputError, match="no rows at all"):
        list(read_metadata(bz, None, ScanStats(), progress=False))
    db = tmp_path / "empty.sql"
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE yfcc100m_dataset ({', '.join(SQL_COLS)})")
    con.commit()
    con.close()
    with pytest.raises(InputError, match=f"{db}: table 'yfcc100m_dataset' holds no rows"):
        list(read_metadata(db, None, ScanStats(), progress=False))


def test_blank_lines_keep_their_numbers(tmp_path):
    from conftest import meta_line
    rows = [meta_line(1, 11, "a", "x", "", "http://x/1.jpg"), b"\n\n\n", meta_line(5, 12, "b", "y", "", "http://x/2.jpg"),
            b"\n", b"too\tfew\n", b"\r\n"]
    path = tmp_path / "m.tsv"
    path.write_bytes(b"".join(rows))
    stats = ScanStats()
    assert [r.where.rsplit(":", 1)[1] for r in read_metadata(path, None, stats, progress=False)] == ["1", "5"]
    assert stats.examples["malformed"] == [f"{path}:7: expected 25 tab-separated columns, found 2"]
    assert stats.counts["rows_read"] == 3

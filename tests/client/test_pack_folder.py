"""The client's packing of a folder for an upload (what `latentbank datasets add FOLDER`
and `client.datasets.add(folder)` send): member by member, relative names, no links."""

import tarfile

from latentbank_client._datasets import pack_folder


def test_a_folder_is_packed_member_by_member_with_relative_names(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "dog").mkdir()
    files = {"cat/2.png": b"two", "cat/10.png": b"ten" * 1000, "dog/a.jpg": b"\x00\xff" * 7}
    for name, data in files.items():
        (tmp_path / "src" / name).write_bytes(data)
    (tmp_path / "src" / "dog" / "link.jpg").symlink_to(tmp_path / "src" / "cat" / "2.png")
    out = pack_folder(tmp_path / "src", tmp_path / "src.tar")
    with tarfile.open(out) as tar:
        names = tar.getnames()
        got = {m: tar.extractfile(m).read() for m in names if m != "src"}
    # the folder's own entry first, then its files under it, sorted; no symlink
    assert names == ["src", *(f"src/{n}" for n in sorted(files))]
    assert {m.removeprefix("src/"): d for m, d in got.items() if m != "src"} == files
